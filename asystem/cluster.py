"""A job on several nodes: its fleet placed on the nodes' agents, and node losses survived.

launch/cluster.py starts one node agent per node and runs `train(config, cluster=Cluster(...))`;
`asystem.job.start_fleet` then calls `start_placed_fleet` here, which

- places every process (asystem/placement.py) and spawns it through its node's agent,
  pinned to its GPUs, with the NCCL/GLOO settings in its environment; trainer rank 0's
  node hands out the ports of the trainers' rendezvous and of the weight group, so that
  group spans the nodes;
- watches every node agent: the job's ActorSystem pings each one every
  `cluster.heartbeat_s`, and an agent that answers nothing for `cluster.dead_after_s`, or
  whose connection closes, is declared dead;
- reports every step through `Cluster.report` (the launcher prints it on the head).

What a lost node, or a lost process, costs:

- rollout worker: `PlacedWorkerSupervisor` starts it again, on its node while that node
  lives and has room, else on another allowed node with room, under the same actor id and
  a new address; the controller requeues its rollouts as continuations on the other
  workers and finds the new ref (`Fleet.find_worker`). Without room anywhere, or after
  `max_restarts` restarts within `within` seconds, the worker is retired and the job goes
  on with the others.
- reward worker: the RewardPool retries its requests elsewhere and starts a new worker,
  placed anew (`RewardPlacer`).
- trainer rank: its shards are gone, so the job stops (`Cluster.stop_job`); the launcher
  says which checkpoint `--resume` goes on from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors import Actor, ActorSystem
from actors.supervision import RestartBudget, SupervisorStrategy
from transport.endpoint import Heartbeat

from .placement import NoCapacity, Node, Placement, Slot
from .train_config import ClusterConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    """The nodes a job runs on, as the launcher found them.

    `head`: the address of the cluster's registry (the launcher's ActorSystem); `host`: the
    head node's address, where the job's own ActorSystem binds. `report(message)` shows a
    message to the user; `stop_job(message)` stops the job (a trainer rank was lost).
    """

    nodes: list[Node]
    head: str
    host: str
    secret: bytes
    pass_env: dict[str, str] = field(default_factory=dict)
    report: Callable[[str], None] = log.warning
    stop_job: Callable[[str], None] = log.error

    def system_options(self, config: ClusterConfig) -> dict[str, Any]:
        """Keyword arguments for the job's ActorSystem: reachable from every node, one
        cluster with the nodes' agents, and their heartbeats."""
        return {"bind": f"tcp://{self.host}:0", "head": self.head, "secret": self.secret,
                "heartbeat": Heartbeat(config.heartbeat_s, config.dead_after_s)}


class PlacedWorkerSupervisor(Actor):
    """Starts rollout workers at their slots and starts a lost one again (module docstring).

    Arguments are passed by reference (spawn it "local"): the job's `Placement` and the
    cluster's `report`.
    """

    max_concurrency = 16  # workers start at once; a restart runs while `find` answers
    stop_timeout = 30.0  # on_stop waits for its workers' own stops (their engines close)

    def __init__(self, placement: Placement, report: Callable[[str], None],
                 max_restarts: int = 5, within: float = 600.0, retry_s: float = 2.0):
        self.placement = placement
        self.report = report
        self.budget = RestartBudget(SupervisorStrategy(max_restarts=max_restarts, within=within))
        self.retry_s = retry_s
        self.workers: list = []  # index -> current ref; None once retired
        self.specs: list[tuple[dict, float]] = []  # index -> (WorkerConfig dict, start timeout)
        self.restarting: set[int] = set()
        self.closing = False

    async def start_worker(self, config: dict, timeout: float):
        """Start the next worker at its planned slot; returns its ref."""
        index = len(self.workers)
        self.workers.append(None)
        self.specs.append((config, timeout))
        slot = self.placement.slot("rollout", index) or self.placement.place("rollout", index)
        return await self._spawn(index, slot, None)

    async def find(self, actor_id: str):
        """The current ref of the worker first started as `actor_id`; None once retired.
        Raises RuntimeError while it is being started again (ask later)."""
        index = next((i for i, r in enumerate(self.workers) if r is not None and r.actor_id == actor_id), None)
        if index in self.restarting:
            raise RuntimeError(f"rollout worker {index} is being started again")
        return None if index is None else self.workers[index]

    async def on_terminated(self, ref, reason: str) -> None:
        index = next((i for i, r in enumerate(self.workers) if r == ref), None)
        if index is not None and not self.closing:
            self.restarting.add(index)
            self.create_task(self._replace(index, ref, reason))

    async def on_stop(self) -> None:
        self.closing = True
        live = [r for r in self.workers if r is not None]
        for ref in live:
            self.unwatch(ref)
            self.system.endpoint.expect_loss(ref.address)  # its process exits with it: not news
        await asyncio.gather(*(self.system.stop(r, timeout=10.0) for r in live), return_exceptions=True)

    async def _spawn(self, index: int, slot: Slot, actor_id: str | None):
        from .rollout import RolloutWorker

        config, timeout = self.specs[index]
        ref = await self.system.spawn(RolloutWorker, config, where=slot.where, env=slot.env,
                                      timeout=timeout, actor_id=actor_id)
        self.workers[index] = ref
        self.watch(ref)
        return ref

    async def _replace(self, index: int, lost, reason: str) -> None:
        """Start worker `index` again (its ref `lost` died of `reason`), retrying until it
        is up, the restart budget is spent or no node has room."""
        try:
            await self._start_again(index, lost, reason)
        finally:
            self.restarting.discard(index)

    async def _start_again(self, index: int, lost, reason: str) -> None:
        while not self.closing:
            if not self.budget.allow():
                strategy = self.budget.strategy
                return self._retire(index, f"it failed more than {strategy.max_restarts} times "
                                           f"within {strategy.within:.0f}s")
            try:
                slot = self.placement.place("rollout", index)
            except NoCapacity as exc:
                return self._retire(index, str(exc))
            self.report(f"rollout worker {index} at {lost.address} is lost ({reason}): "
                        f"starting it again as {slot}")
            try:
                ref = await self._spawn(index, slot, lost.actor_id)
            except Exception as exc:  # noqa: BLE001 - its node may be dying too: place it again
                self.report(f"rollout worker {index} did not start on {slot.node.name}: {exc}; "
                            f"trying again in {self.retry_s:g}s")
                await asyncio.sleep(self.retry_s)
                continue
            self.report(f"rollout worker {index} is back at {ref.address} ({slot})")
            return

    def _retire(self, index: int, why: str) -> None:
        self.workers[index] = None  # find() answers None from now on
        self.placement.release("rollout", index)
        self.report(f"rollout worker {index} is not started again: {why}; "
                    "the job goes on with the other workers")


class RewardPlacer:
    """`where` for a RewardPool: each (re)start of reward worker `index` gets a slot."""

    def __init__(self, placement: Placement, report: Callable[[str], None]):
        self.placement, self.report = placement, report
        self._started: set[int] = set()

    def __call__(self, index: int) -> tuple[Any, dict[str, str]]:
        slot = self.placement.place("reward", index)  # NoCapacity: the pool logs it and retries
        if index in self._started:
            self.report(f"reward worker {index} is started again as {slot}")
        self._started.add(index)
        return slot.where, slot.env


async def start_placed_fleet(system: ActorSystem, config: TrainConfig, model_path, resume, cluster: Cluster):
    """`asystem.job.start_fleet` on the cluster's nodes: see the module docstring."""
    from .controller import Fleet
    from .job import _trainer_config, _worker_config, start_together, trainer_threads
    from .reward import RewardPool
    from .trainer_ranks import TrainerGroup

    nodes = [dataclasses.replace(n, agent=n.agent.bind(system)) for n in cluster.nodes]
    placement = Placement(config.cluster, nodes, cluster.pass_env)
    planned = placement.plan({"trainer": config.trainer_ranks, "rollout": config.rollout.workers,
                              "reward": config.reward.workers})
    cluster.report(f"placement over {len(nodes)} nodes:\n{placement.describe()}")
    await asyncio.gather(*(watch_node(system, n, placement, cluster, config.cluster) for n in nodes))

    timeout = config.rollout.start_timeout_s
    rank0 = planned["trainer"][0]
    master_port = await rank0.where.ask("free_port", timeout=30.0)
    supervisor = await system.spawn(PlacedWorkerSupervisor, placement, cluster.report)
    rewards = RewardPool(system, workers=config.reward.workers, timeout=config.reward.timeout_s,
                         where=RewardPlacer(placement, cluster.report))
    worker_cfg = _worker_config(config, model_path)
    workers, trainers = await start_together(
        supervisor, worker_cfg, config.rollout.workers, timeout, rewards,
        TrainerGroup.start(system, _trainer_config(config, model_path), world_size=config.trainer_ranks,
                           timeout_s=timeout, torch_threads=trainer_threads(config), slots=planned["trainer"],
                           master_addr=rank0.node.host, master_port=master_port))
    for rank, ref in enumerate(trainers.ranks):
        _watch_trainer(system, rank, ref, placement, cluster)
    cluster.report("started: " + "; ".join(f"{role} {i} at {ref.address}" for role, refs in
                                           (("trainer", trainers.ranks), ("rollout", workers))
                                           for i, ref in enumerate(refs)))
    if resume is not None:
        from . import checkpoint

        await trainers.load_checkpoint(resume / checkpoint.TRAINER_DIR, timeout=1800.0)

    async def rendezvous() -> tuple[str, int]:
        slot = placement.slot("trainer", 0)
        return slot.node.host, await slot.where.ask("free_port", timeout=30.0)

    return Fleet(workers=workers, trainers=trainers, rewards=rewards, supervisor=supervisor,
                 rendezvous=rendezvous)


async def watch_node(system: ActorSystem, node: Node, placement: Placement, cluster: Cluster,
                      config: ClusterConfig) -> None:
    """Declare `node` dead when its agent's connection closes or its heartbeats stop."""
    def lost(reason: str) -> None:
        if node.name in placement.dead:
            return
        held = placement.node_lost(node.name, reason)
        what = ", ".join(f"{s.role} {s.index}" for s in held) or "nothing of this job"
        cluster.report(f"node {node.name} ({node.host}) is declared dead: its agent at "
                       f"{node.agent.address} is gone ({reason}; heartbeats every "
                       f"{config.heartbeat_s:g}s, dead after {config.dead_after_s:g}s without one). "
                       f"It ran: {what}.")
        trainers = [s.index for s in held if s.role == "trainer"]
        if trainers:
            cluster.stop_job(f"trainer rank(s) {trainers} were on the lost node {node.name}")
        elif held:
            cluster.report("its workers are started again on the other nodes where there is room; "
                           "their rollouts go on as continuations and their reward requests are retried")

    try:  # the connection its heartbeats run on
        await node.agent.ask("info", timeout=config.dead_after_s)
    except Exception as exc:  # noqa: BLE001 - any failure here means the node is unusable
        lost(f"no answer at start-up: {exc}")
        return
    system.when_lost(node.agent.address).add_done_callback(lambda f: lost(f.result()))


def _watch_trainer(system: ActorSystem, rank: int, ref, placement: Placement, cluster: Cluster) -> None:
    slot = placement.slot("trainer", rank)
    where = slot.node.name if slot else "a lost node"

    def lost(reason: str) -> None:
        cluster.stop_job(f"trainer rank {rank} on {where} at {ref.address} is lost: {reason}")
    system.when_lost(ref.address).add_done_callback(lambda f: lost(f.result()))
