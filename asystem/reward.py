"""Rewards as a service: a pool of reward actors scores responses as trajectories finish.

    pool = await RewardPool(system, workers=2).start()      # two reward processes
    reward = await pool.score(item, response_text)          # float; see ring.rewards
    rewards = await pool.score_many([(item, text), ...])    # concurrently, in order
    await pool.close()

Three layers, each usable alone:

- `Scorer`: in-process and async. Every verifier of ring.rewards, plus async custom ones
  and code, which runs in a `Sandbox` it starts on first need.
- `RewardWorker`: an actor around a Scorer. Up to `max_concurrency` scores at once, so
  code executions overlap with each other and with quick math checks.
- `RewardPool`: spreads requests over N workers (the least busy first) so that scoring
  never holds up generation, with a deadline on each request.

Failures, and what the pool does (each counted in `stats()` and logged):

- the worker died (its process crashed or was killed): the request is retried on another
  worker, up to `attempts` tries within the request's deadline, and the dead worker is
  replaced in the background as soon as its process or node is lost, busy or idle
  (`worker_deaths`, `retries`, `respawns`);
- the worker did not answer in time (each try gets an equal share of what is left of the
  deadline) or its mailbox stayed full: the next try goes to another worker (`timeouts`,
  `busy`). A worker whose event loop is stuck keeps its place: the
  pool cannot tell it from a busy one;
- the verifier raised (a bad item, a custom function's bug): no retry, the same input
  would fail again; `RewardError` with the remote traceback (`verifier_errors`); likewise
  a request the runtime refuses (over the message size limit: `refused`);
- tries or deadline exhausted: `RewardError` naming the item, the deadline and the last
  cause (`failed`). The caller decides: drop the trajectory or score it later.

A program that misbehaves in the sandbox is an ordinary failed execution (reward 0.0),
never a failure of the worker.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from actors import (
    Actor,
    ActorDeadError,
    ActorError,
    ActorRef,
    AskTimeout,
    MailboxFullError,
    RemoteError,
)
from asystem.sandbox import Limits, Sandbox
from ring import rewards
from ring.tasks import TaskItem

log = logging.getLogger(__name__)

CODE_LIMITS = Limits(wall_s=10.0, cpu_s=10.0)


class RewardError(RuntimeError):
    """A response could not be scored; the message says which item, why and by when."""


class Scorer:
    """Scores responses in this process; code items run in a Sandbox started on demand.

    `sandbox_workers`: how many code executions run at once. `limits`: per execution.
    """

    def __init__(self, sandbox_workers: int = 2, limits: Limits = CODE_LIMITS):
        self.sandbox_workers = sandbox_workers
        self.limits = limits
        self.sandbox: Sandbox | None = None
        self._starting: asyncio.Lock | None = None

    async def score(self, item: TaskItem, response: str) -> float:
        """The reward for `response` (ring.rewards documents each verifier)."""
        if not isinstance(response, str):
            raise TypeError(f"{item.item_id}: response must be str, got {type(response).__name__}")
        if item.verifier == "code":
            return await self._score_code(item, response)
        if ":" in item.verifier:
            value = rewards.load_verifier(item.verifier)(item, response)
            if inspect.isawaitable(value):
                value = await value
            return rewards.check_reward(item, value)
        return rewards.score(item, response)

    async def _score_code(self, item: TaskItem, response: str) -> float:
        cases = rewards.code_cases(item, response)
        sandbox = await self._sandbox()
        results = await asyncio.gather(*(sandbox.run(c.source, c.stdin, self.limits) for c in cases))
        return rewards.code_reward(cases, [(r.ok, r.stdout) for r in results])

    async def _sandbox(self) -> Sandbox:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:  # concurrent first code items start one sandbox
            if self.sandbox is None:
                self.sandbox = await Sandbox(workers=self.sandbox_workers, limits=self.limits).start()
        return self.sandbox

    def stats(self) -> dict[str, Any]:
        if self.sandbox is None:
            return {}
        return {"sandbox": self.sandbox.stats(), "isolation": self.sandbox.isolation}

    async def close(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.close()


class RewardWorker(Actor):
    """A reward actor: `score(item_dict, response) -> float` (see Scorer)."""

    max_concurrency = 16

    def __init__(self, sandbox_workers: int = 2, limits: dict | None = None):
        self.scorer = Scorer(sandbox_workers, Limits(**limits) if limits else CODE_LIMITS)
        self.scored = 0

    async def score(self, item: dict, response: str) -> float:
        reward = await self.scorer.score(TaskItem.from_dict(item), response)
        self.scored += 1
        return reward

    async def stats(self) -> dict[str, Any]:
        return {"scored": self.scored, **self.scorer.stats()}

    async def on_stop(self) -> None:
        await self.scorer.close()


class _Slot:
    """One worker of the pool as the pool sees it."""

    def __init__(self, index: int):
        self.index = index
        self.ref: ActorRef | None = None
        self.in_flight = 0
        self.respawning: asyncio.Task | None = None


class RewardPool:
    """Scores requests on `workers` RewardWorker actors (see the module docstring).

    `where`: where workers run ("process": each in its own OS process, so a crash or a
    hang takes one worker, never the caller), or a function of the worker's index that
    returns `(where, env)` for `spawn`, asked at every start and restart (a cluster places
    workers on its nodes: asystem/cluster.py). `timeout`: the default deadline of one
    request, retries included. `attempts`: tries per request. `spawn_timeout`: bounds the
    start of a worker.
    """

    def __init__(self, system, workers: int = 2, *, where: Any = "process",
                 sandbox_workers: int = 2, limits: Limits = CODE_LIMITS, timeout: float = 60.0,
                 attempts: int = 2, spawn_timeout: float = 60.0):
        if workers < 1 or attempts < 1:
            raise ValueError(f"RewardPool: workers and attempts must be >= 1, got {workers}, {attempts}")
        self.system = system
        self.where = where
        self.timeout = timeout
        self.attempts = attempts
        self.spawn_timeout = spawn_timeout
        self.counters: Counter[str] = Counter()
        self._worker_args = (sandbox_workers, asdict(limits))
        self._slots = [_Slot(i) for i in range(workers)]
        self._turn = itertools.count()
        self._closed = False

    async def start(self) -> RewardPool:
        """Spawn every worker; SpawnError if one does not come up within spawn_timeout."""
        refs = await asyncio.gather(*(self._spawn(s.index) for s in self._slots), return_exceptions=True)
        for slot, ref in zip(self._slots, refs):
            if isinstance(ref, BaseException):
                await self.close()
                raise ref
            slot.ref = ref
            self._watch(slot)
        return self

    async def _spawn(self, index: int) -> ActorRef:
        where, env = self.where(index) if callable(self.where) else (self.where, None)
        return await self.system.spawn(RewardWorker, *self._worker_args, where=where, env=env,
                                       timeout=self.spawn_timeout)

    def _watch(self, slot: _Slot) -> None:
        """Replace the worker as soon as its process (or node) is lost, not only when a
        request to it fails: an idle worker that died would otherwise be found out by the
        next request, or never if that request timed out."""
        ref = slot.ref
        if ref is None or ref.address == self.system.address:
            return  # in this process: it dies with us

        def lost(fut: asyncio.Future) -> None:
            if slot.ref is ref and slot.respawning is None and not self._closed and not fut.cancelled():
                self.counters["worker_deaths"] += 1
                log.warning("reward pool: worker %d at %s is lost (%s); starting it again",
                            slot.index, ref.address, fut.result())
                self._respawn(slot)
        self.system.when_lost(ref.address).add_done_callback(lost)

    async def score(self, item: TaskItem, response: str, timeout: float | None = None) -> float:
        """The reward for `response`, within `timeout` seconds (default: the pool's)."""
        if self._closed:
            raise RewardError("reward pool is closed")
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        payload = item.to_dict()
        cause = "no worker was available"
        tried: set[int] = set()
        for attempt in range(1, self.attempts + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            slot = await self._pick(deadline, avoid=tried)
            if slot is None:
                break
            tried.add(slot.index)
            if attempt > 1:
                self.counters["retries"] += 1
            slot.in_flight += 1
            asked = slot.ref
            try:
                share = left / (self.attempts - attempt + 1)  # leave time for the tries after
                reward = await asked.ask("score", payload, response, timeout=share)
            except RemoteError as exc:
                self.counters["verifier_errors"] += 1
                raise RewardError(f"{item.item_id}: verifier {item.verifier} raised on "
                                  f"{slot.ref}: {exc}") from None
            except ActorDeadError as exc:
                cause = f"worker {slot.index} died ({exc})"
                log.warning("reward pool: %s while scoring %s; retrying elsewhere", cause, item.item_id)
                if slot.ref is asked and slot.respawning is None:  # not yet seen by _watch
                    self.counters["worker_deaths"] += 1
                    self._respawn(slot)
                continue
            except (AskTimeout, MailboxFullError) as exc:
                self.counters["timeouts" if isinstance(exc, AskTimeout) else "busy"] += 1
                cause = f"worker {slot.index} did not take or answer the request in time ({exc})"
                continue
            except ActorError as exc:  # the request itself is refused (too large, malformed)
                self.counters["refused"] += 1
                raise RewardError(f"{item.item_id}: {slot.ref} refused the request: {exc}") from None
            finally:
                slot.in_flight -= 1
            self.counters["scored"] += 1
            return reward
        self.counters["failed"] += 1
        message = (f"{item.item_id}: no reward within {timeout}s after {attempt} attempt(s) "
                   f"of {self.attempts}; last: {cause}")
        log.warning("reward pool: %s", message)
        raise RewardError(message)

    async def score_many(self, pairs: Iterable[tuple[TaskItem, str]],
                         timeout: float | None = None) -> list[float]:
        """Rewards for (item, response) pairs, scored concurrently, in the pairs' order.
        The first RewardError is raised once every request has ended."""
        results = await asyncio.gather(*(self.score(i, r, timeout) for i, r in pairs),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _pick(self, deadline: float, avoid: set[int]) -> _Slot | None:
        """The live worker with the fewest requests in flight (ties in turn), one not in
        `avoid` if there is one; waits for a respawn when all are dead, until the deadline."""
        while time.monotonic() < deadline:
            live = [s for s in self._slots if s.ref is not None and s.respawning is None]
            live = [s for s in live if s.index not in avoid] or live
            if live:
                turn = next(self._turn)
                return min(live, key=lambda s: (s.in_flight, (s.index - turn) % len(self._slots)))
            pending = [s.respawning for s in self._slots if s.respawning is not None]
            if not pending:
                return None
            await asyncio.wait(pending, timeout=deadline - time.monotonic())
        return None

    def _respawn(self, slot: _Slot) -> None:
        if slot.respawning is None and not self._closed:
            slot.respawning = asyncio.create_task(self._replace(slot))

    async def _replace(self, slot: _Slot) -> None:
        """Start a new worker for a dead one, retrying (with a pause) until one starts."""
        try:
            while not self._closed:
                try:
                    slot.ref = await self._spawn(slot.index)
                    self.counters["respawns"] += 1
                    self._watch(slot)
                    return
                except Exception as exc:  # noqa: BLE001 - logged, counted, retried
                    self.counters["respawn_failures"] += 1
                    log.warning("reward pool: worker %d could not be restarted: %r", slot.index, exc)
                    await asyncio.sleep(1.0)
        finally:
            slot.respawning = None

    def stats(self) -> dict[str, int]:
        """scored, retries, timeouts, busy, worker_deaths, respawns, respawn_failures,
        verifier_errors, refused, failed; and the workers' requests in flight."""
        return {**self.counters, "in_flight": sum(s.in_flight for s in self._slots)}

    async def worker_stats(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Each live worker's own stats (scored, sandbox counters and isolation)."""
        live = [s for s in self._slots if s.ref is not None and s.respawning is None]
        return await asyncio.gather(*(s.ref.ask("stats", timeout=timeout) for s in live))

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (each finishes what it is scoring, up to `timeout`)."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            if slot.respawning is not None:
                slot.respawning.cancel()
        refs = [s.ref for s in self._slots if s.ref is not None]
        await asyncio.gather(*(self.system.stop(ref, timeout) for ref in refs), return_exceptions=True)
