"""The single controller: where a prompt becomes a trajectory, a reward, a gradient, new weights.

One asyncio process drives the whole job (RING1T.md 3, SingleController + SPMD). It owns
the C3PO++ scheduler and talks to three fleets of actors, each in processes of their own:

    prompts --admit--> RolloutWorkers --token chunks--> scheduler.on_tokens
                                      --finished------> RewardPool.score --> scheduler.on_finished
    scheduler.ready() --take_batch--> TrainerGroup.train_step (FSDP2 ranks) --> version t+1
    trainer rank 0 --broadcast (its own process group)--> RolloutWorkers: load (resubmit: paused)

Overlap: while the trainer works on step t, the engines keep generating under theta_t for
step t+1. The scheduler stops admitting once the next batch is complete (C >= Phi), and an
unfinished rollout carries over at most sigma steps: that bounds the staleness. A batch is
taken only when the trainer is free, so each step trains on one batch.

Control goes through the controller; token ids and logprobs are small, and weights never
pass through it: they go from trainer rank 0 straight to the engines.

Faults:
- A rollout worker that dies is restarted by its supervisor (`WorkerSupervisor`,
  one_for_one). Its rollouts keep their tokens so far (they are in the scheduler) and go
  on as continuations on the other workers, or on it once it is back; the weight group is
  formed again with it and it gets the current weights before it decodes. On a cluster a
  worker whose node is lost starts elsewhere under a new ref (asystem/cluster.py); one with
  no room left anywhere is retired and the job goes on with the others.
- A reward request is retried by the RewardPool; one that still fails drops its group
  (counted, logged; the prompt is requeued when `requeue_dropped`).
- A trainer rank that fails stops the job with an error naming it: the newest checkpoint
  is where `--resume` goes on.
Every such event is counted (`count/...` in the metrics) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from actors import Actor, SupervisorStrategy

from . import checkpoint
from .engine import SamplingParams
from .weights import WeightSyncSpec, free_port

log = logging.getLogger(__name__)


class WorkerSupervisor(Actor):
    """Parent of the rollout workers: restarts one that dies, up to 5 times in 10 minutes."""

    supervisor_strategy = SupervisorStrategy("one_for_one", max_restarts=5, within=600.0)

    async def start_worker(self, config: dict, timeout: float):
        from .rollout import RolloutWorker

        return await self.spawn(RolloutWorker, config, where="process", timeout=timeout)


@dataclass
class Fleet:
    """The actors a job drives."""

    workers: list  # RolloutWorker refs
    trainers: Any  # asystem.trainer_ranks.TrainerGroup
    rewards: Any  # asystem.reward.RewardPool
    supervisor: Any = None  # on a cluster (asystem/cluster.py): finds workers that moved
    rendezvous: Any = None  # on a cluster: async () -> (host, port) free on trainer rank 0's node

    async def find_worker(self, index: int):
        """Worker `index` now: the same ref after a restart in place, a new one after a move
        to another node, None once it is retired."""
        if self.supervisor is None:
            return self.workers[index]
        return await self.supervisor.ask("find", self.workers[index].actor_id, timeout=10.0)


class StepClock:
    """Busy time of each part of the pipeline within one step.

    `generation`: time at least one rollout was decoding; `reward`: time at least one score
    was pending; `training` and `sync`: the trainer's and the weight update's time;
    `idle`: time the engines had nothing to decode. Parts overlap; `step` is the wall time
    between two weight versions, the first step's from the clock's creation, which
    `Controller.run` does when training starts.
    """

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.busy: dict[str, float] = defaultdict(float)
        self._since: dict[str, float] = {}

    def set(self, part: str, active: bool) -> None:
        now = time.monotonic()
        if active and part not in self._since:
            self._since[part] = now
        elif not active and part in self._since:
            self.busy[part] += now - self._since.pop(part)

    def lap(self) -> dict[str, float]:
        """This step's figures; the clock goes on with the next step."""
        now = time.monotonic()
        for part, since in self._since.items():
            self.busy[part] += now - since
            self._since[part] = now
        figures = {f"time/{part}": self.busy.get(part, 0.0) for part in ("generation", "reward", "training", "sync")}
        figures["time/step"] = now - self.start
        figures["time/idle"] = max(0.0, figures["time/step"] - figures["time/generation"])
        self.busy.clear()
        self.start = now
        return figures


@dataclass
class _Rollout:
    """Where one rollout is decoded, and its end once the engine reported it."""

    worker: int
    finished: str | None = None  # finish reason, before the reward is in


@dataclass
class _Eval:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    done: dict[str, asyncio.Future] = field(default_factory=dict)


class Controller:
    """Runs one training job; see the module docstring.

    `prompts` is an iterator of `ring.trajectory.Prompt` with a `position` (saved in
    checkpoints); `items(prompt_id)` gives the task item a reward is computed against;
    `metrics` is an `asystem.metrics.MetricsLog`, `view` an optional `LiveView`.
    """

    def __init__(self, config, fleet: Fleet, scheduler, prompts, items, tokenizer, metrics,
                 view=None, eval_prompts=(), step: int = 0, counters: dict | None = None) -> None:
        self.config = config
        self.fleet = fleet
        self.scheduler = scheduler
        self.prompts = prompts
        self.items = items
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.view = view
        self.eval_prompts = list(eval_prompts)
        self.step = step
        self.counters: dict[str, int] = defaultdict(int, counters or {})
        self.sampling = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                                       max_tokens=config.rollout.max_tokens)
        self.clock = StepClock()
        self.last_record: dict[str, Any] = {}
        self._rollouts: dict[int, _Rollout] = {}
        self._load = [0] * len(fleet.workers)
        self._down: set[int] = set()
        self._group_of: tuple[int, ...] | None = None  # workers in the current weight group
        self._trainer_lock = asyncio.Lock()  # a train step + its sync, a checkpoint, a resync
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._evals = _Eval()
        self._pending_scores = 0
        self._step_tokens = 0
        self._training: asyncio.Task | None = None
        self._failure: BaseException | None = None

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, steps: int, deadline: float | None, finished_unscored: dict[str, str] | None = None) -> None:
        """Train until `steps` steps are done or the monotonic `deadline` passes.

        Rollouts the scheduler holds unfinished (a resumed run) go on as continuations;
        `finished_unscored` (traj id -> finish reason) are rescored instead.
        """
        try:
            await self.sync_weights(self.scheduler.version, force=self.scheduler.version > 0)
            await self._ensure_group(self._live())
            # Steps are timed from here: start-up, the held-out evaluation before training and
            # forming the weight group belong to no step.
            self.clock = StepClock()
            finished_unscored = {int(k): v for k, v in (finished_unscored or {}).items()}
            for traj in self.scheduler.in_flight():
                if traj.traj_id in finished_unscored:
                    self._rollouts[traj.traj_id] = _Rollout(0, finished_unscored[traj.traj_id])
                    self._spawn(self._score(traj.traj_id, finished_unscored[traj.traj_id]))
            await self._submit([t for t in self.scheduler.in_flight() if t.traj_id not in finished_unscored])
            next_status = time.monotonic() + 10.0
            while self.step < steps and (deadline is None or time.monotonic() < deadline):
                self._raise_failure()
                if self._training is None or self.scheduler.overlaps_training:
                    await self._admit()
                if time.monotonic() > next_status:
                    self._status()
                    next_status = time.monotonic() + 10.0
                if self._training is None and self.scheduler.ready():
                    self._training = asyncio.create_task(self._train(self.scheduler.take_batch()))
                    self._training.add_done_callback(self._training_done)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
            if self._training is not None:
                await asyncio.shield(self._training)
            self._raise_failure()
        finally:
            self.clock.set("generation", False)

    def start(self) -> None:
        """Follow every worker's progress stream (until `close`)."""
        for worker in range(len(self.fleet.workers)):
            self._spawn(self._consume(worker))

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _admit(self) -> None:
        if len(self._down) == len(self.fleet.workers):
            return  # nowhere to run them; admitted prompts would only wait
        started = self.scheduler.admit(self.prompts)
        if started:
            self.counters["rollouts_started"] += len(started)
            await self._submit(started)

    async def _submit(self, trajs) -> None:
        """Send rollouts (new, or continuations with their tokens so far) to the least loaded
        live workers; with none live, they wait in the scheduler for one to come back."""
        live = self._live()
        if not trajs or not live:
            return
        by_worker: dict[int, list[dict]] = defaultdict(list)
        for traj in trajs:
            worker = min(live, key=lambda i: self._load[i])
            self._load[worker] += 1
            self._rollouts[traj.traj_id] = _Rollout(worker)
            by_worker[worker].append({
                "request_id": str(traj.traj_id), "prompt_tokens": list(traj.prompt_tokens),
                "sampling": self.sampling.to_dict(), "response_tokens": list(traj.response_tokens),
                "logprobs": list(traj.infer_logprobs), "versions": list(traj.versions)})
        self.clock.set("generation", True)
        results = await asyncio.gather(*(self.fleet.workers[w].ask("submit", reqs, timeout=60.0)
                                         for w, reqs in by_worker.items()), return_exceptions=True)
        for (worker, reqs), result in zip(by_worker.items(), results):
            if isinstance(result, Exception):  # that worker is failing: its consumer requeues them
                log.warning("submit to rollout worker %d failed: %s", worker, result)

    # -- token chunks from the engines ---------------------------------------------------------

    async def _consume(self, worker: int) -> None:
        """Follow one worker's progress stream; when it breaks, requeue and wait for a restart."""
        idle = 60.0  # a live worker yields [] every second when it has nothing to say
        while True:
            ref = self.fleet.workers[worker]  # new after a move to another node
            try:
                async for chunks in ref.stream("progress", window=64, timeout=idle):
                    for chunk in chunks:
                        self._on_chunk(worker, chunk)
                    if chunks:
                        self._wake.set()
                raise RuntimeError("its progress stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not await self._worker_lost(worker, exc):
                    return  # retired

    def _on_chunk(self, worker: int, chunk: dict) -> None:
        rid = chunk["request_id"]
        if rid.startswith("eval-"):
            self._on_eval_chunk(rid, chunk)
            return
        traj_id = int(rid)
        rollout = self._rollouts.get(traj_id)
        if rollout is None or rollout.finished is not None or rollout.worker != worker:
            self.counters["late_chunks"] += 1  # decoded before a cancel or a requeue arrived
            return
        if chunk["tokens"]:
            self.scheduler.on_tokens(traj_id, chunk["tokens"], chunk["logprobs"], chunk["version"])
            self._step_tokens += len(chunk["tokens"])
        if chunk["finish_reason"]:
            rollout.finished = chunk["finish_reason"]
            self._load[worker] -= 1
            if not any(self._load):
                self.clock.set("generation", False)
            self._spawn(self._score(traj_id, rollout.finished))

    async def _score(self, traj_id: int, reason: str) -> None:
        traj = self.scheduler.trajectory(traj_id)
        if traj is None:  # its group was dropped meanwhile
            self._rollouts.pop(traj_id, None)
            return
        self._pending_scores += 1
        self.clock.set("reward", True)
        try:
            reward = None
            if reason != "aborted":
                text = self.tokenizer.decode(traj.response_tokens, skip_special_tokens=True)
                try:
                    reward = await self.fleet.rewards.score(self.items(traj.prompt_id), text,
                                                            timeout=self.config.reward.timeout_s)
                except Exception as exc:  # the pool retried already
                    log.warning("reward of rollout %d failed (%s): its group is dropped", traj_id, exc)
                    self.counters["reward_failures"] += 1
                    reason = "aborted"
            else:
                self.counters["rollouts_aborted"] += 1
            self._rollouts.pop(traj_id, None)
            await self._cancel(self.scheduler.on_finished(traj_id, reason, reward))
        finally:
            self._pending_scores -= 1
            if not self._pending_scores:
                self.clock.set("reward", False)
            self._wake.set()

    async def _cancel(self, traj_ids: list[int]) -> None:
        by_worker: dict[int, list[str]] = defaultdict(list)
        for traj_id in traj_ids:
            rollout = self._rollouts.pop(traj_id, None)
            if rollout is not None and rollout.finished is None:
                self._load[rollout.worker] -= 1
                by_worker[rollout.worker].append(str(traj_id))
        self.counters["rollouts_cancelled"] += sum(map(len, by_worker.values()))
        for worker, ids in by_worker.items():
            if worker not in self._down:
                try:
                    await self.fleet.workers[worker].ask("cancel", ids, timeout=60.0)
                except Exception as exc:  # a dead worker has nothing left to stop
                    log.info("cancel on rollout worker %d: %s", worker, exc)

    async def _worker_lost(self, worker: int, exc: BaseException) -> bool:
        """Requeue a lost worker's rollouts, wait for its restart, give it the weights.
        False when it is retired instead."""
        ref = self.fleet.workers[worker]
        self._down.add(worker)
        self._group_of = None  # the weight group lost a member: form it again
        self.counters["rollout_worker_failures"] += 1
        mine = [t for t in self.scheduler.in_flight()
                if (r := self._rollouts.get(t.traj_id)) and r.worker == worker and r.finished is None]
        for traj in mine:
            del self._rollouts[traj.traj_id]
        self._load[worker] = 0
        log.warning("rollout worker %d (%s) lost: %s; %d rollouts go on elsewhere as continuations",
                    worker, ref, exc, len(mine))
        self.counters["rollouts_requeued"] += len(mine)
        await self._submit(mine)  # with no worker live, they wait in the scheduler
        timeout = self.config.rollout.start_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = await self.fleet.find_worker(worker)
                if found is None:
                    return self._worker_retired(worker, exc)
                await found.ask("health", timeout=10.0)
                break
            except Exception as probe:
                if time.monotonic() > deadline:
                    self._failure = RuntimeError(
                        f"rollout worker {worker} ({ref}) did not come back within {timeout:.0f}s "
                        f"after it failed ({exc}); last probe: {probe}")
                    self._wake.set()
                    raise self._failure from None
                await asyncio.sleep(1.0)
        self.fleet.workers[worker] = found
        async with self._trainer_lock:
            await self.sync_weights(self.scheduler.version, force=True, rejoin=worker)
        self.counters["rollout_worker_restarts"] += 1
        log.warning("rollout worker %d is back with weights version %d", worker, self.scheduler.version)
        orphans = [t for t in self.scheduler.in_flight() if t.traj_id not in self._rollouts]
        await self._submit(orphans)  # rollouts that waited because no worker was live
        self._wake.set()
        return True

    def _worker_retired(self, worker: int, exc: BaseException) -> bool:
        """Worker `worker` will not come back (no room left for it): go on without it."""
        self.counters["rollout_workers_retired"] += 1
        live = len(self.fleet.workers) - len(self._down)
        log.warning("rollout worker %d is retired after it failed (%s); %d workers go on", worker, exc, live)
        if not live:
            self._failure = RuntimeError(f"no rollout worker left: worker {worker}, the last one, is retired ({exc})")
            self._wake.set()
        return False

    # -- training and weights -------------------------------------------------------------------

    async def _train(self, batch) -> None:
        await self._cancel(batch.cancelled)
        trajs = batch.trajectories
        async with self._trainer_lock:
            self.clock.set("training", True)
            started = time.monotonic()
            metrics = await self.fleet.trainers.train_step(trajs, timeout=3600.0)
            train_s = time.monotonic() - started
            self.clock.set("training", False)
            self.clock.set("sync", True)
            sync = await self.sync_weights(batch.version + 1)
            self.clock.set("sync", False)
            self.step += 1
            figures = self.clock.lap()
            self._report(batch, metrics, {**figures, "time/train_step": train_s, **sync})
            run = self.config.run
            if run.checkpoint_every and self.step % run.checkpoint_every == 0:
                await self.save_checkpoint()
        if run.eval_every and self.step % run.eval_every == 0:
            self._spawn(self._eval_and_log(self.step))

    def _training_done(self, task: asyncio.Task) -> None:
        self._training = None
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
        self._wake.set()

    async def sync_weights(self, version: int, force: bool = False, rejoin: int | None = None) -> dict[str, float]:
        """Move the trainer's weights (of `version`) to every live worker. With
        `update_mode: resubmit` the workers are paused first (their rollouts interrupted) and
        resumed after; with `keep` they decode on while the weights arrive, and each engine
        applies them between two of its steps (the engine contract, asystem/engine.py).

        Skipped when the engines already hold `version` (unless `force`). `rejoin` is a
        worker back from a restart: it is down until it has the weights.
        """
        live = self._live(rejoin)
        if not live or (not force and version == 0):
            return {}
        refs = [self.fleet.workers[i] for i in live]
        wcfg = self.config.weights
        started = time.monotonic()
        pause = self.config.rollout.update_mode == "resubmit"
        if pause:
            await asyncio.gather(*(r.ask("pause", timeout=120.0) for r in refs))
        try:
            plan = await self.fleet.trainers.weight_plan(None if wcfg.bucket_mb is None else wcfg.bucket_mb << 20)
            if plan["version"] != version:
                raise RuntimeError(f"weight sync: the trainer holds version {plan['version']}, expected {version}")
            if wcfg.transport == "zmq":
                sent = await self.fleet.trainers.push_weights(refs, plan, timeout=wcfg.timeout_s)
            else:
                await self._ensure_group(live)
                received = [r.ask("receive_weights", plan, wcfg.timeout_s, timeout=wcfg.timeout_s + 10.0)
                            for r in refs]
                results = await asyncio.gather(
                    self.fleet.trainers.broadcast_weights(plan, timeout=wcfg.timeout_s), *received,
                    return_exceptions=True)
                failed = next((r for r in results if isinstance(r, BaseException)), None)
                if failed is not None:
                    self._group_of = None  # a failed broadcast leaves the group unusable
                    raise failed
                sent = results[0]
        finally:
            if pause:
                await asyncio.gather(*(r.ask("resume", timeout=120.0) for r in refs), return_exceptions=True)
        if rejoin is not None:
            self._down.discard(rejoin)
        return {"time/weights_transfer": sent.get("seconds", 0.0), "time/weights_total": time.monotonic() - started,
                "weights/bytes": sent.get("bytes", 0)}

    def _live(self, rejoin: int | None = None) -> list[int]:
        """The indices of the workers that are up, and of `rejoin` (one coming back)."""
        return [i for i in range(len(self.fleet.workers)) if i not in self._down or i == rejoin]

    async def _ensure_group(self, live: list[int]) -> None:
        """Form the broadcast group of workers `live` unless it is formed already. `run`
        calls it before the first step: forming takes seconds (a rendezvous of every engine
        and trainer rank 0), which the first step's weight update would otherwise spend."""
        if self.config.weights.transport != "zmq" and live and self._group_of != tuple(live):
            await self._form_group(live)

    async def _form_group(self, live: list[int]) -> None:
        wcfg = self.config.weights
        from .device import collective_backend

        host, port = await self.fleet.rendezvous() if self.fleet.rendezvous else ("127.0.0.1", free_port())
        spec = WeightSyncSpec(host=host, port=port, world_size=1 + len(live),
                              backend=collective_backend(), timeout_s=wcfg.timeout_s).to_dict()
        joins = [self.fleet.workers[w].ask("join_weight_group", spec, rank, timeout=wcfg.timeout_s + 10.0)
                 for rank, w in enumerate(live, start=1)]
        await asyncio.gather(self.fleet.trainers.join_weight_group(spec, timeout=wcfg.timeout_s + 10.0), *joins)
        self._group_of = tuple(live)
        self.counters["weight_groups_formed"] += 1

    # -- what the user sees ------------------------------------------------------------------------

    def _report(self, batch, train: dict, figures: dict) -> None:
        trajs = batch.trajectories
        rewards = [t.reward for t in trajs if t.reward is not None]
        stale = [batch.version - min(t.versions) for t in trajs if t.versions]
        record = {
            "version": self.scheduler.version,
            "reward/mean": sum(rewards) / max(1, len(rewards)),
            "reward/solved": sum(r >= 1.0 for r in rewards) / max(1, len(rewards)),
            "batch/trajectories": len(trajs), "batch/tokens": batch.num_tokens,
            "batch/mean_length": batch.num_tokens / max(1, len(trajs)),
            "batch/truncated": sum(t.finish_reason.value == "length" for t in trajs) / max(1, len(trajs)),
            "staleness/mean": sum(stale) / max(1, len(stale)), "staleness/max": max(stale, default=0),
            "rollout/tokens_per_s": self._step_tokens / max(1e-9, figures["time/step"]),
            **{k if "/" in k else f"train/{k}": v for k, v in train.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)},
            **figures,
            **{f"count/{k}": v for k, v in {**self.scheduler.counters(), **self.counters}.items()},
        }
        self._step_tokens = 0
        self.metrics.write(self.step, record, batch=[(t.traj_id, t.prompt_id) for t in trajs])
        self.last_record = {"step": self.step, **record}
        if self.view is not None:
            self.view.update(self.last_record)
        else:
            log.info("step %d: reward %.3f, %d trajectories, %.1f tokens/s, masked %.4f, staleness %.2f, "
                     "%.1fs (generation %.1fs, training %.1fs, sync %.1fs)", self.step, record["reward/mean"],
                     len(trajs), record["rollout/tokens_per_s"], record.get("train/masked_frac", 0.0),
                     record["staleness/mean"], figures["time/step"], figures["time/generation"],
                     figures["time/training"], figures["time/sync"])

    def _status(self) -> None:
        """One line on the step in progress, every few seconds (the first step can take minutes)."""
        budget = getattr(self.scheduler, "config", None)
        phi = getattr(budget, "token_budget", None)
        line = (f"step {self.step + 1}: {self.scheduler.complete_tokens}"
                f"{f'/{phi}' if phi else ''} tokens in complete groups, {sum(self._load)} rollouts decoding, "
                f"{self._pending_scores} being scored, {self._step_tokens} tokens decoded this step"
                f"{', training' if self._training is not None else ''}")
        if self.view is not None:
            self.view.note(line)
        else:
            log.info(line)

    # -- held-out evaluation --------------------------------------------------------------------------

    async def evaluate(self) -> float:
        """Greedy accuracy on the held-out prompts (a reward of 1 counts as solved), decoded by
        the engines alongside the rollouts."""
        live = self._live()
        if not self.eval_prompts or not live:
            return float("nan")
        greedy = SamplingParams(temperature=0.0, max_tokens=self.config.rollout.max_tokens).to_dict()
        tag = f"eval-{time.monotonic_ns()}-"
        by_worker: dict[int, list[dict]] = defaultdict(list)
        loop = asyncio.get_running_loop()
        for n, prompt in enumerate(self.eval_prompts):
            rid = f"{tag}{n}"
            self._evals.tokens[rid] = []
            self._evals.done[rid] = loop.create_future()
            by_worker[live[n % len(live)]].append({"request_id": rid, "prompt_tokens": list(prompt.tokens),
                                                  "sampling": greedy})
        await asyncio.gather(*(self.fleet.workers[w].ask("submit", reqs, timeout=60.0)
                               for w, reqs in by_worker.items()))
        rids = [f"{tag}{n}" for n in range(len(self.eval_prompts))]
        try:
            texts = []
            for rid in rids:
                tokens = await self._eval_result(rid)
                texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
            scores = await asyncio.gather(*(self.fleet.rewards.score(self.items(p.prompt_id), text)
                                            for p, text in zip(self.eval_prompts, texts)))
        finally:
            for rid in rids:
                self._evals.tokens.pop(rid, None)
                self._evals.done.pop(rid, None)
        return sum(s >= 1.0 for s in scores) / len(scores)

    async def _eval_result(self, rid: str) -> list[int]:
        # Bounded like any wait: an engine that stops answering fails the job, it does not hang it.
        limit = self.config.rollout.start_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(self._evals.done[rid]), limit)
        except TimeoutError:
            raise TimeoutError(f"evaluation: no answer to {rid} from the rollout workers within {limit:.0f}s") from None

    def _on_eval_chunk(self, rid: str, chunk: dict) -> None:
        if rid not in self._evals.tokens:
            return
        self._evals.tokens[rid].extend(chunk["tokens"])
        if chunk["finish_reason"] and not self._evals.done[rid].done():
            self._evals.done[rid].set_result(self._evals.tokens[rid])

    async def _eval_and_log(self, step: int) -> None:
        try:
            accuracy = await self.evaluate()
        except Exception as exc:  # noqa: BLE001 - a failed evaluation must not stop training
            self.counters["evaluations_failed"] += 1
            log.warning("held-out evaluation after step %d failed: %s", step, exc)
            return
        self.metrics.write(step, {"eval/accuracy": accuracy})
        if self.view is not None:
            self.view.note(f"held-out greedy accuracy after step {step}: {accuracy:.3f}")

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on with nothing lost and nothing duplicated."""
        return {
            "step": self.step,
            "data_position": self.prompts.position,
            "scheduler": self.scheduler.state_dict(),
            # Ended in the engine, reward not yet in: rescored on resume, not decoded again.
            "finished_unscored": {str(k): r.finished for k, r in self._rollouts.items() if r.finished},
            "counters": dict(self.counters),
        }

    async def save_checkpoint(self) -> None:
        """Trainer state and controller state, atomically (asystem/checkpoint.py). Called
        with the trainer lock held, between a weight sync and the next step."""
        started = time.monotonic()
        out = self.config.run.out
        tmp = checkpoint.begin(out, self.step)
        await self.fleet.trainers.save_checkpoint(tmp / checkpoint.TRAINER_DIR, timeout=1800.0)
        checkpoint.write_state(tmp, self.state_dict())
        path = checkpoint.commit(tmp, self.step)
        self.counters["checkpoints"] += 1
        log.info("checkpoint %s written in %.1fs", path, time.monotonic() - started)

    # -- housekeeping --------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
            self._wake.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
