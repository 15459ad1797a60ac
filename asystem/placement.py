"""Placement: which node, and which GPUs, each process of a job runs on.

    placement = Placement(config.cluster, nodes)          # nodes: the cluster's node agents
    placement.plan({"trainer": 4, "rollout": 4, "reward": 2})
    slot = placement.slot("rollout", 1)                   # node, GPU ids, where=, env=
    ref = await system.spawn(RolloutWorker, cfg, where=slot.where, env=slot.env)
    lost = placement.node_lost("node2", "no heartbeat for 10s")   # the slots it held
    slot = placement.place("rollout", 1)                  # a new place for a lost process

Pure bookkeeping: no I/O, no clock; the caller spawns, watches and reports.

Rules:
- A process of a role with `gpus` = g gets g GPUs of one node: the lowest ids free there,
  named in its CUDA_VISIBLE_DEVICES (with ASYSTEM_DEVICE=cuda). A process without GPUs gets
  CUDA_VISIBLE_DEVICES="" and ASYSTEM_DEVICE=cpu, so it never takes a GPU memory context.
  `cluster.env` and the NCCL_*/GLOO_* variables given to `Placement` go to every process.
- Trainer ranks are packed: each on the lowest-ranked allowed node with room, so rank 0
  (the rendezvous and the weight group's store) is on the first allowed node and ranks
  share nodes. Rollout and reward workers are spread: each on the allowed node with the
  fewest processes of its role, then the fewest processes, then the lowest rank.
- `place` for a process that has a slot frees it first, then prefers the same node (a
  crashed process's GPUs are free again); a node declared lost never gets a process again.
  When no allowed live node has room, `NoCapacity` says what was needed and what each
  node has free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .train_config import ClusterConfig, RoleResources

ROLES = ("trainer", "rollout", "reward")
PACKED = frozenset({"trainer"})


class NoCapacity(RuntimeError):
    """No live node allowed for a role has room for one more of its processes."""


@dataclass(frozen=True)
class Node:
    """One node of the cluster as its launcher reported it."""

    name: str
    rank: int
    host: str
    """The address other nodes reach it by (processes there bind on it)."""
    gpu_ids: tuple[str, ...] = ()
    """The GPUs processes there may use, as CUDA_VISIBLE_DEVICES names them."""
    agent: Any = None
    """Its NodeAgent's ActorRef: `where` for a spawn there."""


@dataclass(frozen=True)
class Slot:
    """Where one process runs: pass `where` and `env` to `spawn`."""

    role: str
    index: int
    node: Node
    gpus: tuple[str, ...]
    env: dict[str, str] = field(hash=False)

    @property
    def where(self) -> Any:
        return self.node.agent

    def __str__(self) -> str:
        gpus = f"GPU {','.join(self.gpus)}" if self.gpus else "no GPU"
        return f"{self.role} {self.index} on {self.node.name} ({self.node.host}, {gpus})"


class Placement:
    """Slots of every process of a job over `nodes`; see the module docstring.

    `pass_env`: variables for every process besides `config.env` (the launcher passes the
    NCCL_*/GLOO_* part of its own environment); `config.env` wins on a clash.
    """

    def __init__(self, config: ClusterConfig, nodes: list[Node], pass_env: dict[str, str] | None = None):
        if not nodes:
            raise ValueError("Placement: no nodes")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names) or len({n.rank for n in nodes}) != len(nodes):
            raise ValueError(f"Placement: node names and ranks must be unique, got {names}")
        self.config = config
        self.nodes = sorted(nodes, key=lambda n: n.rank)
        self.env = {**(pass_env or {}), **config.env}
        self.dead: dict[str, str] = {}  # node name -> why it was declared lost
        self._slots: dict[tuple[str, int], Slot] = {}
        has_gpus = any(n.gpu_ids for n in nodes)
        self._gpus = {role: _gpus(self._resources(role), has_gpus) for role in ROLES}
        for role in ROLES:
            per_node = self._resources(role).per_node
            if per_node is not None and per_node < 1:
                raise ValueError(f"cluster.{role}.per_node must be >= 1 or null, got {per_node}")
            allowed = self._resources(role).nodes
            unknown = sorted(set(allowed or ()) - {n.rank for n in nodes})
            if unknown:
                raise ValueError(f"cluster.{role}.nodes: no node of rank {unknown} "
                                 f"(the cluster has ranks {[n.rank for n in self.nodes]})")

    def plan(self, counts: dict[str, int]) -> dict[str, list[Slot]]:
        """Place `counts[role]` processes of each role (trainer ranks first); NoCapacity if
        they do not fit. Returns the slots by role, in index order."""
        for role in ROLES:
            for index in range(counts.get(role, 0)):
                self.place(role, index)
        return {role: [self._slots[(role, i)] for i in range(counts.get(role, 0))] for role in ROLES}

    def slot(self, role: str, index: int) -> Slot | None:
        return self._slots.get((role, index))

    def slots(self, node: str | None = None) -> list[Slot]:
        """Every slot (of one node), ordered by role and index."""
        found = [s for s in self._slots.values() if node is None or s.node.name == node]
        return sorted(found, key=lambda s: (ROLES.index(s.role), s.index))

    def place(self, role: str, index: int) -> Slot:
        """A slot for process `index` of `role`, replacing the one it had (see the rules)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {ROLES}")
        old = self._slots.pop((role, index), None)
        need = self._gpus[role]
        candidates = [n for n in self._allowed(role) if self._room(n, role, need)]
        if not candidates:
            raise NoCapacity(self._why_full(role, need))
        if old is not None and old.node in candidates:
            node = old.node
        elif role in PACKED:
            node = candidates[0]
        else:
            node = min(candidates, key=lambda n: (self._count(n, role), self._count(n), n.rank))
        taken = {g for s in self.slots(node.name) for g in s.gpus}
        gpus = tuple([g for g in node.gpu_ids if g not in taken][:need])
        slot = Slot(role, index, node, gpus, self._env(gpus))
        self._slots[(role, index)] = slot
        return slot

    def release(self, role: str, index: int) -> None:
        """Process `index` of `role` is gone for good: its GPUs are free."""
        self._slots.pop((role, index), None)

    def node_lost(self, name: str, reason: str) -> list[Slot]:
        """Declare node `name` dead: it gets no process again. Returns the slots it held
        (they are released: place them again elsewhere)."""
        self.dead.setdefault(name, reason)
        held = self.slots(name)
        for slot in held:
            del self._slots[(slot.role, slot.index)]
        return held

    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.name not in self.dead]

    def describe(self) -> str:
        """A table of where everything runs, one line per node."""
        lines = []
        for node in self.nodes:
            held = ", ".join(f"{s.role} {s.index}" + (f" [GPU {','.join(s.gpus)}]" if s.gpus else "")
                             for s in self.slots(node.name))
            state = f"LOST ({self.dead[node.name]})" if node.name in self.dead else f"{len(node.gpu_ids)} GPUs"
            lines.append(f"  {node.name:<10} rank {node.rank:<3} {node.host:<16} {state:<10} {held or '-'}")
        return "\n".join(lines)

    # -- capacity ------------------------------------------------------------------------

    def _resources(self, role: str) -> RoleResources:
        return getattr(self.config, role)

    def _allowed(self, role: str) -> list[Node]:
        allowed = self._resources(role).nodes
        return [n for n in self.live_nodes() if allowed is None or n.rank in allowed]

    def _count(self, node: Node, role: str | None = None) -> int:
        return sum(1 for s in self.slots(node.name) if role is None or s.role == role)

    def _free_gpus(self, node: Node) -> int:
        return len(node.gpu_ids) - sum(len(s.gpus) for s in self.slots(node.name))

    def _room(self, node: Node, role: str, need: int) -> bool:
        limit = self._resources(role).per_node
        return self._free_gpus(node) >= need and (limit is None or self._count(node, role) < limit)

    def _why_full(self, role: str, need: int) -> str:
        resources = self._resources(role)
        nodes = ", ".join(f"{n.name}: {self._free_gpus(n)} GPUs free, {self._count(n, role)} {role}"
                          for n in self._allowed(role)) or "none alive"
        limit = f", at most {resources.per_node} per node" if resources.per_node is not None else ""
        where = f"nodes {resources.nodes}" if resources.nodes is not None else "any node"
        return (f"no room for one more {role} process ({need} GPUs each{limit}, on {where}); "
                f"allowed live nodes: {nodes}")

    def _env(self, gpus: tuple[str, ...]) -> dict[str, str]:
        device = {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "ASYSTEM_DEVICE": "cuda" if gpus else "cpu"}
        return {**self.env, **device}


def _gpus(resources: RoleResources, cluster_has_gpus: bool) -> int:
    if resources.gpus is None:
        return 1 if cluster_has_gpus else 0
    if resources.gpus < 0:
        raise ValueError(f"cluster: gpus must be >= 0, got {resources.gpus}")
    return resources.gpus


def passed_env(environ: dict[str, str]) -> dict[str, str]:
    """The part of a launcher's environment every process of the job gets: NCCL_* and GLOO_*."""
    return {k: v for k, v in environ.items() if k.startswith(("NCCL_", "GLOO_"))}
