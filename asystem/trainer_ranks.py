"""The trainer as actors: one `TrainerRank` process per data-parallel rank, and
`TrainerGroup`, which starts the ranks of a job and calls them together.

    group = await TrainerGroup.start(system, TrainerConfig(model_path=...), world_size=2)
    metrics = await group.train_step(batch.trajectories(), timeout=600)
    plan = await group.weight_plan()              # the engines receive with this plan
    await group.broadcast_weights(plan, timeout=120)
    await group.save_checkpoint(path)
    await group.stop()

Every rank gets the whole batch and computes the same split (asystem/trainer.py): the
controller sends one message per rank and nothing else coordinates them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from actors import Actor
from asystem.malloc import trainer_env
from asystem.trainer import DTYPES, Trainer, TrainerConfig
from ring.trajectory import Trajectory

log = logging.getLogger(__name__)

class TrainerRank(Actor):
    """A `Trainer` in an actor, one per process (`spawn(TrainerRank, ..., where="process")`).

    Arguments travel as plain data: the config as `TrainerConfig.to_dict()`, trajectories
    as `Trajectory.to_dict()`, weight plans as `BucketPlan.to_dict()`. The work runs in one
    dedicated thread, so the actor keeps answering heartbeats and the calls of one rank run
    in order. Methods marked *collective* must be called on all ranks together
    (`TrainerGroup` does). A call whose caller gives up still finishes in that thread; the
    group is then out of step and should be restarted from a checkpoint.

    Weights reach the engines in one of two ways (asystem/weights.py):
    - the broadcast group: `join_weight_group(spec)` once (the engines join the same spec
      meanwhile), then per version `weight_plan` (the controller gives the plan to the
      engines' `receive_weights`) and `broadcast_weights(plan)` on all ranks;
    - through actor messages: `push_weights(engine_refs, plan)` on all ranks.
    """

    def __init__(self, config: dict, rank: int, world_size: int, torch_threads: int | None = None,
                 cpu_cores: Sequence[int] | None = None):
        if cpu_cores:  # before the work thread and torch's threads start: they inherit it
            os.sched_setaffinity(0, cpu_cores)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.trainer = Trainer(TrainerConfig.from_dict(config), rank, world_size)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"trainer-{rank}")
        self._sender = None  # WeightSender of rank 0, once it joined a weight group

    async def on_stop(self) -> None:
        await self._run(self._close)
        self._thread.shutdown(wait=False)

    async def setup(self, master_addr: str, master_port: int, timeout_s: float = 600.0) -> dict:
        """*Collective.* `Trainer.setup`; returns `Trainer.info()`."""
        return await self._run(self.trainer.setup, master_addr, master_port, timeout_s)

    async def info(self) -> dict:
        """`Trainer.info()`, the malloc settings this process runs with (asystem/malloc.py),
        and the cores its work thread may run on."""
        return await self._run(lambda: {**self.trainer.info(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                                        "cpu_cores": sorted(os.sched_getaffinity(0))})

    async def train_step(self, trajectories: list[dict], advantages: list[float] | None = None) -> dict:
        """*Collective.* `Trainer.train_step` on `Trajectory.to_dict()`s; returns the metrics."""
        batch = [Trajectory.from_dict(t) for t in trajectories]
        return await self._run(self.trainer.train_step, batch, advantages)

    async def save_checkpoint(self, path: str) -> None:
        """*Collective.* `Trainer.save_checkpoint`."""
        await self._run(self.trainer.save_checkpoint, path)

    async def load_checkpoint(self, path: str) -> dict:
        """*Collective.* `Trainer.load_checkpoint`; returns `Trainer.info()` after it."""
        await self._run(self.trainer.load_checkpoint, path)
        return await self._run(self.trainer.info)

    async def gather_weights(self, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """*Collective.* {name: full tensor on CPU} on rank 0, {} on the others
        (`Trainer.named_weights`; dtype "bf16" or "fp32", default `weights_dtype`)."""
        return await self._run(lambda: {name: t.cpu() for name, t in self._named(dtype)})

    async def weight_plan(self, bucket_bytes: int | None = None) -> dict:
        """The `BucketPlan` dict of the current weights, labelled with the current version.

        Computed from shapes alone (no collective, any rank answers the same). None: the
        default bucket size of the trainer's device type (`DEFAULT_BUCKET_BYTES`)."""
        from asystem.weight_plan import DEFAULT_BUCKET_BYTES, BucketPlan

        # The layout's tensors live on the meta device: the default must come from ours.
        size = bucket_bytes or DEFAULT_BUCKET_BYTES.get(self.trainer.device.type, DEFAULT_BUCKET_BYTES["cpu"])

        def plan() -> dict:
            return BucketPlan.build(self.trainer.version, self.trainer.weight_layout(), size).to_dict()
        return await self._run(plan)

    async def join_weight_group(self, spec: dict) -> None:
        """Rank 0 joins the weight group `spec` (a `WeightSyncSpec` dict) as its rank 0,
        leaving any group it was in; blocks until every engine joined or `spec.timeout_s`
        passes. Other ranks return at once."""
        return await self._run(self._join, spec)

    async def broadcast_weights(self, plan: dict, timeout_s: float) -> dict:
        """*Collective.* Send the current weights as `plan` over the joined weight group.

        All ranks gather the shards; rank 0 sends and returns once every engine holds
        the whole version. `plan` must be `weight_plan()` of the current version (else
        ValueError on rank 0, and the engines time out). Returns {"version", "bytes",
        "seconds"} (bytes 0 on other ranks); WeightSyncError from asystem/weights.py when an
        engine fails or the deadline passes (the group is then broken: join a new one).
        """
        return await self._run(self._broadcast, plan, timeout_s)

    async def push_weights(self, engines: list, plan: dict, timeout_s: float) -> dict:
        """*Collective.* Send the current weights as `plan` to each engine actor in
        `engines` through actor messages (`asystem.weights.push_over_actors`), all engines
        at once. All ranks gather; rank 0 pushes. Returns as `broadcast_weights`."""
        from asystem.weights import BucketPlan, push_over_actors

        started = time.perf_counter()
        named = await self._run(lambda: [(name, t.cpu()) for name, t in self._named(None)])
        if self.trainer.rank != 0:
            return {"version": self.trainer.version, "bytes": 0, "seconds": time.perf_counter() - started}
        plan = self._current(BucketPlan.from_dict(plan))
        await asyncio.gather(*(push_over_actors(ref, plan, named, timeout_s) for ref in engines))
        return {"version": plan.version, "bytes": plan.total_bytes, "seconds": time.perf_counter() - started}

    def _named(self, dtype: str | None) -> Iterator[tuple[str, torch.Tensor]]:
        return self.trainer.named_weights(DTYPES[dtype] if dtype else None)

    def _current(self, plan):
        if plan.version != self.trainer.version:
            raise ValueError(f"trainer rank 0: the weight plan is for version {plan.version}, "
                             f"the weights are version {self.trainer.version}")
        return plan

    def _join(self, spec: dict) -> None:
        from asystem.weights import WeightGroup, WeightSender, WeightSyncSpec

        if self.trainer.rank != 0:
            return
        if self._sender is not None:
            self._sender.group.close()
            self._sender = None
        group = WeightGroup.join(WeightSyncSpec.from_dict(spec), rank=0, device=self.trainer.device)
        self._sender = WeightSender(group)

    def _broadcast(self, plan: dict, timeout_s: float) -> dict:
        from asystem.weights import BucketPlan

        started = time.perf_counter()
        named = list(self._named(None))
        if self.trainer.rank != 0:
            return {"version": self.trainer.version, "bytes": 0, "seconds": time.perf_counter() - started}
        if self._sender is None:
            raise RuntimeError("trainer rank 0: broadcast_weights before join_weight_group")
        stats = self._sender.send(self._current(BucketPlan.from_dict(plan)), named, timeout_s)
        return {"version": stats.version, "bytes": stats.bytes, "seconds": time.perf_counter() - started}

    def _close(self) -> None:
        if self._sender is not None:
            self._sender.group.close()
        self.trainer.close()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


class TrainerGroup:
    """The trainer ranks of a job, each in its own process, called together.

        group = await TrainerGroup.start(system, config, world_size=2)
        metrics = await group.train_step(batch_trajectories, timeout=600)
        await group.save_checkpoint("out/ckpt")
        await group.stop()

    Every method asks all ranks at once and returns rank 0's answer (all ranks compute the
    same metrics). If any rank raises or misses the deadline, the method raises that
    error after every rank has answered or timed out; the ranks may then be out of step
    (one waits in a collective for another), so treat the group as broken.
    """

    def __init__(self, system, ranks: list):
        self.system = system
        self.ranks = ranks

    @classmethod
    async def start(cls, system, config: TrainerConfig, world_size: int = 1, *, master_addr: str = "127.0.0.1",
                    master_port: int | None = None, timeout_s: float = 300.0,
                    collective_timeout_s: float = 600.0, torch_threads: int | None = None,
                    cpu_cores: Sequence[Sequence[int]] | None = None, slots: Sequence | None = None) -> TrainerGroup:
        """Spawn `world_size` TrainerRank processes on this host and set them up.

        `timeout_s` bounds start-up (spawn, rendezvous, model loading);
        `collective_timeout_s` bounds every later collective. On CPU each rank gets
        cpu_count / world_size threads unless `torch_threads` says otherwise, and rank r runs
        on the cores `cpu_cores[r]` when given (asystem.job.trainer_cores). `slots`
        (asystem.placement.Slot per rank) runs each rank at its slot's `where` with its
        `env` instead; `master_addr` must then be rank 0's host, `master_port` free there.
        Each rank's process starts with the malloc settings of asystem/malloc.py.
        """
        port = master_port or free_port(master_addr)
        threads = torch_threads or max(1, (os.cpu_count() or 1) // world_size)
        spawned = await asyncio.gather(*(
            system.spawn(TrainerRank, config.to_dict(), rank, world_size, threads,
                         list(cpu_cores[rank]) if cpu_cores else None, timeout=timeout_s,
                         where=slots[rank].where if slots else "process",
                         env={**trainer_env(), **(slots[rank].env if slots else {})})
            for rank in range(world_size)), return_exceptions=True)
        group = cls(system, [r for r in spawned if not isinstance(r, BaseException)])
        try:
            failed = next((r for r in spawned if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            await group._all("setup", master_addr, port, collective_timeout_s, timeout=timeout_s)
        except BaseException:
            await group.stop()
            raise
        return group

    async def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float] | None = None,
                         timeout: float = 600.0) -> dict:
        batch = [t.to_dict() for t in trajectories]
        return await self._all("train_step", batch, None if advantages is None else list(advantages),
                               timeout=timeout)

    async def save_checkpoint(self, path: str | os.PathLike, timeout: float = 600.0) -> None:
        await self._all("save_checkpoint", str(path), timeout=timeout)

    async def load_checkpoint(self, path: str | os.PathLike, timeout: float = 600.0) -> dict:
        return await self._all("load_checkpoint", str(path), timeout=timeout)

    async def gather_weights(self, dtype: str | None = None, timeout: float = 120.0) -> dict[str, torch.Tensor]:
        return await self._all("gather_weights", dtype, timeout=timeout)

    async def weight_plan(self, bucket_bytes: int | None = None, timeout: float = 30.0) -> dict:
        return await self.ranks[0].ask("weight_plan", bucket_bytes, timeout=timeout)

    async def join_weight_group(self, spec: dict, timeout: float = 120.0) -> None:
        await self.ranks[0].ask("join_weight_group", spec, timeout=timeout)

    async def broadcast_weights(self, plan: dict, timeout: float = 120.0) -> dict:
        # The ranks' own deadline is `timeout`; the ask's is a little later, so that a late
        # engine surfaces as the ranks' WeightSyncError rather than as an AskTimeout.
        return await self._all("broadcast_weights", plan, timeout, timeout=timeout + 10.0)

    async def push_weights(self, engines: list, plan: dict, timeout: float = 120.0) -> dict:
        return await self._all("push_weights", engines, plan, timeout, timeout=timeout + 10.0)

    async def info(self, timeout: float = 30.0) -> list[dict]:
        """Every rank's `Trainer.info()`, in rank order."""
        return await asyncio.gather(*(r.ask("info", timeout=timeout) for r in self.ranks))

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop every rank (their processes exit; one that does not is killed). A rank that
        fails to stop is logged, and the others are still stopped."""
        results = await asyncio.gather(*(self.system.stop(r, timeout=timeout) for r in self.ranks),
                                       return_exceptions=True)
        for rank, result in enumerate(results):
            if isinstance(result, BaseException):
                log.warning("trainer rank %d (%s): stopping failed: %r", rank, self.ranks[rank], result)

    async def _all(self, method: str, *args, timeout: float) -> Any:
        answers = await asyncio.gather(*(r.ask(method, *args, timeout=timeout) for r in self.ranks),
                                       return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for the process group's rendezvous)."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
