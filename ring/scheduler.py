"""Rollout schedulers: C3PO++ (budgeted, partial rollouts) and the synchronous baseline.

A scheduler decides which rollouts run and which finished ones form a training batch. It
is a pure state machine: it never decodes, waits or talks to anyone. A controller feeds it
events and acts on what it returns:

    while training:
        for traj in scheduler.admit(prompts):        # start these (prompt + traj_id)
            engine.start(traj)
        ...engine reports progress...
        scheduler.on_tokens(traj_id, tokens, logprobs, version)
        engine.cancel(scheduler.on_finished(traj_id, "eos" | "length" | "aborted", reward))
        if scheduler.ready():
            batch = scheduler.take_batch()           # ends the step
            engine.cancel(batch.cancelled)
            train(batch); publish weights of version batch.version + 1

C3PO++ (RING1T.md 2), one iteration t with token budget Phi, retention limit sigma and
inference-pool capacity Omega_infer:
1. drop every unfinished rollout whose retention count would exceed sigma;
2. while C < Phi: refill the inference pool up to Omega_infer, decode; a finished rollout
   moves to the training pool and adds its length to C;
3. train theta_t -> theta_{t+1} on the training pool;
4. unfinished rollouts stay, retention + 1, and continue under the new weights.

Here `admit` is the refill of step 2, `ready` is "C >= Phi", and `take_batch` hands over
the batch of step 3 and performs step 4 and the next iteration's step 1 at once.

Choices where the report is silent (also in docs/algorithms.md):

- Groups. GRPO needs all G responses of a prompt, so the unit of admission and of training
  is the group. A prompt is admitted as G rollouts at once, only when G inference slots are
  free (Omega_infer counts unfinished rollouts). A finished response waits in the training
  pool until its whole group has finished; only then does the group count towards C. So C
  is the number of response tokens in complete groups not yet trained. Because a group's
  members start together, they share one retention count.
- Budget respected. `ready()` is true exactly when C >= Phi. `take_batch()` takes complete
  groups in the order they completed and stops as soon as their tokens reach Phi: a batch
  holds at least Phi tokens and less than Phi plus the tokens of its last group. Complete
  groups beyond that stay for the next step (counting towards its C). `admit` refills only
  while C < Phi, as in step 2. Prompt tokens do not count.
- Decoding ahead (Omega_train). The report's step 2 admits only while C < Phi. In an
  asynchronous pipeline that starts prompts in bursts: once a step's batch is complete
  nothing starts until the trainer takes it, and the engines then run a refill of up to
  Omega_infer rollouts that all start (and end) together, idle while the trainer drains the
  backlog they made. With `train_capacity` (Omega_train, the report's training-pool
  capacity, counted here over every live rollout, unfinished or waiting) admission ignores
  C and goes on while G more live rollouts fit: the engines decode ahead of the trainer by
  at most Omega_train rollouts, and a group starts whenever one is trained, so the
  inference pool stays evenly filled. Staleness grows with the lead (a rollout waits about
  Omega_train / batch steps from its start to its training step); IcePop masks what
  drifted too far. So that a pool too small to reach Phi cannot stall, admission also
  goes on whenever nothing is decoding and C < Phi.
- Retention. A rollout's retention is the number of step ends it has lived through
  unfinished. At a step end, a rollout with retention already sigma is dropped instead of
  carried over, so a live rollout always has retention <= sigma and is decoded by at most
  sigma + 1 policy versions (the report's "up to sigma" counts one fewer). sigma = 0 means
  nothing is carried over.
- Dropped rollouts. Dropping one member drops its whole group: the unfinished members are
  cancelled (their ids are returned, the engines must stop them) and the finished members
  are discarded. The prompt is requeued ahead of new prompts (`requeue_dropped=True`; it
  restarts as a new group with new trajectory ids) or discarded (default). A response the engine
  reports as "aborted" drops its group the same way.
- Late events. Events about a trajectory that no longer lives (trained, dropped) are
  ignored and counted as `stale_events`: in an asynchronous system a cancelled rollout
  may still report tokens it decoded before the cancel arrived. Events about ids never
  handed out raise KeyError.

Invariants (tests/ring/test_scheduler.py checks them under random event orders): every
started trajectory is, at any time, in exactly one of: in flight, waiting in the training
pool, trained in exactly one batch, or dropped; retention <= sigma; unfinished rollouts
<= Omega_infer; state_dict() round-trips exactly, and a restored scheduler answers every
later event as the original would.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

from ring.trajectory import FinishReason, Prompt, Trajectory


@dataclass(frozen=True)
class C3POConfig:
    """Settings of the C3PO++ schedule (the report does not give Ring-1T's values)."""

    group_size: int
    """G: responses sampled per prompt; a group trains only when all G have finished."""
    infer_capacity: int
    """Omega_infer: most unfinished rollouts at once (must be >= G)."""
    token_budget: int
    """Phi: response tokens of complete groups that close a step."""
    retention_limit: int
    """sigma: most step ends a rollout may live through unfinished before it is dropped."""
    requeue_dropped: bool = False
    """Requeue a dropped group's prompt (ahead of new prompts) instead of discarding it."""
    train_capacity: int | None = None
    """Omega_train: most live rollouts (unfinished, or finished and not yet trained). None:
    admit only while C < Phi, as the report's step 2. Set, admission goes on past C >= Phi
    while the live rollouts stay within it, so that the engines decode ahead of the trainer
    by a bounded amount (see the module docstring)."""

    def __post_init__(self) -> None:
        _positive("C3POConfig.group_size", self.group_size)
        _positive("C3POConfig.token_budget", self.token_budget)
        if self.infer_capacity < self.group_size:
            raise ValueError(
                f"C3POConfig.infer_capacity ({self.infer_capacity}) must be >= group_size ({self.group_size})"
            )
        if self.train_capacity is not None and self.train_capacity < self.group_size:
            raise ValueError(
                f"C3POConfig.train_capacity ({self.train_capacity}) must be >= group_size ({self.group_size})"
            )
        if self.retention_limit < 0:
            raise ValueError(f"C3POConfig.retention_limit must be >= 0, got {self.retention_limit}")


@dataclass(frozen=True)
class SyncConfig:
    """Settings of the synchronous schedule: every step trains every response it started."""

    group_size: int
    """G: responses sampled per prompt."""
    groups_per_step: int
    """Prompts started at the beginning of each step."""
    requeue_dropped: bool = False
    """Requeue the prompt of an aborted or dropped group (ahead of new prompts) instead of discarding it."""

    def __post_init__(self) -> None:
        _positive("SyncConfig.group_size", self.group_size)
        _positive("SyncConfig.groups_per_step", self.groups_per_step)


@dataclass
class Batch:
    """What one training step trains on, and what the engines must stop."""

    version: int
    """Policy version theta_t the step starts from; training produces version + 1."""
    groups: list[list[Trajectory]]
    """Complete groups (G finished responses each, by sample index) in completion order."""
    cancelled: list[int]
    """Ids of unfinished trajectories dropped at this step end: the engines must stop them."""

    @property
    def trajectories(self) -> list[Trajectory]:
        return [t for group in self.groups for t in group]

    @property
    def num_tokens(self) -> int:
        """Response tokens in the batch (what the budget counts)."""
        return sum(t.num_response_tokens for group in self.groups for t in group)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "groups": [[t.to_dict() for t in g] for g in self.groups],
            "cancelled": list(self.cancelled),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        return cls(
            version=int(data["version"]),
            groups=[[Trajectory.from_dict(t) for t in g] for g in data["groups"]],
            cancelled=[int(i) for i in data["cancelled"]],
        )


class RolloutScheduler(Protocol):
    """The interface a controller drives; both schedules implement it."""

    version: int
    overlaps_training: bool
    """May rollouts start while the trainer trains the last batch? If False, the controller
    admits only once that step's training and weight update are done."""

    def admit(self, prompts: Iterator[Prompt]) -> list[Trajectory]: ...
    def on_tokens(self, traj_id: int, tokens: Sequence[int], logprobs: Sequence[float], version: int) -> None: ...
    def on_finished(self, traj_id: int, reason: FinishReason | str, reward: float | None = None) -> list[int]: ...
    def ready(self) -> bool: ...
    def take_batch(self, force: bool = False) -> Batch: ...
    def in_flight(self) -> list[Trajectory]: ...
    def waiting(self) -> list[Trajectory]: ...
    def trajectory(self, traj_id: int) -> Trajectory | None: ...
    def counters(self) -> dict[str, int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class _Group:
    group_id: int
    prompt: Prompt
    members: list[int]  # trajectory ids, by sample index


_COUNTERS = (
    "steps",
    "groups_started", "trajectories_started",
    "groups_trained", "trajectories_trained", "tokens_trained",
    "groups_dropped_retention", "groups_dropped_aborted", "groups_dropped_unfinished",
    "trajectories_dropped", "trajectories_cancelled", "tokens_dropped",
    "prompts_requeued", "prompts_discarded",
    "stale_events",
)


class _RolloutPool:
    """The bookkeeping both schedules share: live trajectories, groups, events, state.

    Subclasses decide admission (`admit`), when a step may close (`ready`) and what a
    step trains on and carries over (`take_batch`).
    """

    _kind = ""

    def __init__(self, group_size: int, requeue_dropped: bool) -> None:
        self._group_size = group_size
        self._requeue_dropped = requeue_dropped
        self.version = 0
        self._next_traj_id = 0
        self._next_group_id = 0
        self._trajs: dict[int, Trajectory] = {}  # live: in flight or waiting; ascending id
        self._groups: dict[int, _Group] = {}  # live groups; ascending id
        self._complete: deque[int] = deque()  # complete groups not yet trained, completion order
        self._requeued: deque[Prompt] = deque()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        # Derived from the above (recomputed on load), kept to make events O(1).
        self._num_in_flight = 0
        self._complete_tokens = 0

    # -- events -----------------------------------------------------------------------

    def on_tokens(self, traj_id: int, tokens: Sequence[int], logprobs: Sequence[float], version: int) -> None:
        """Record newly decoded tokens of trajectory `traj_id`, sampled by policy `version`.

        Ignored (counted as stale) if the trajectory was already trained or dropped.
        Raises KeyError for an id never handed out, ValueError if `version` is newer than
        the scheduler's, older than the trajectory's last token, or the trajectory finished.
        """
        traj = self._live(traj_id, "on_tokens")
        if traj is None:
            return
        if version > self.version:
            raise ValueError(f"on_tokens: trajectory {traj_id} reports version {version}, newer than {self.version}")
        traj.append(tokens, logprobs, version)

    def on_finished(self, traj_id: int, reason: FinishReason | str, reward: float | None = None) -> list[int]:
        """Record that trajectory `traj_id` ended, with its reward if already known.

        "eos" and "length" move it to the training pool; when the last member of its group
        finishes, the group becomes trainable. "aborted" drops the whole group (see the
        module docstring). Returns the ids the engines must stop (the aborted one's
        unfinished siblings); empty otherwise. Ignored (counted) if the trajectory is no
        longer live; ValueError if it had already finished.
        """
        reason = FinishReason(reason)
        traj = self._live(traj_id, "on_finished")
        if traj is None:
            return []
        if traj.finished:
            raise ValueError(f"on_finished: trajectory {traj_id} already finished ({traj.finish_reason.value})")
        traj.finish_reason, traj.reward = reason, (None if reward is None else float(reward))
        self._num_in_flight -= 1
        if reason is FinishReason.ABORTED:
            return self._drop_group(traj.group_id, "aborted")
        group = self._groups[traj.group_id]
        if all(self._trajs[m].finished for m in group.members):
            self._complete.append(group.group_id)
            self._complete_tokens += self._group_tokens(group)
        return []

    # -- views ------------------------------------------------------------------------

    def in_flight(self) -> list[Trajectory]:
        """Copies of the unfinished trajectories, by id (e.g. to resubmit after a restart)."""
        return [_copy(t) for t in self._trajs.values() if not t.finished]

    def waiting(self) -> list[Trajectory]:
        """Copies of the finished, not yet trained trajectories, by id."""
        return [_copy(t) for t in self._trajs.values() if t.finished]

    def trajectory(self, traj_id: int) -> Trajectory | None:
        """A copy of live trajectory `traj_id`, or None once it was trained or dropped."""
        traj = self._trajs.get(traj_id)
        return None if traj is None else _copy(traj)

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    @property
    def complete_tokens(self) -> int:
        """C: response tokens of complete groups waiting to be trained."""
        return self._complete_tokens

    def counters(self) -> dict[str, int]:
        """A copy of the event counters (see _COUNTERS); monotone over the run."""
        return dict(self._counters)

    # -- shared mechanics ---------------------------------------------------------------

    def _live(self, traj_id: int, method: str) -> Trajectory | None:
        traj = self._trajs.get(traj_id)
        if traj is not None:
            return traj
        if 0 <= traj_id < self._next_traj_id:
            self._counters["stale_events"] += 1
            return None
        raise KeyError(f"{method}: trajectory {traj_id} was never started")

    def _next_prompt(self, prompts: Iterator[Prompt]) -> Prompt | None:
        # Requeued prompts go first: they were admitted earlier and have waited longest.
        if self._requeued:
            return self._requeued.popleft()
        return next(prompts, None)

    def _start_group(self, prompt: Prompt) -> list[Trajectory]:
        group = _Group(self._next_group_id, prompt, [])
        self._next_group_id += 1
        started = []
        for index in range(self._group_size):
            traj = Trajectory(
                traj_id=self._next_traj_id,
                group_id=group.group_id,
                prompt_id=prompt.prompt_id,
                sample_index=index,
                prompt_tokens=list(prompt.tokens),
            )
            self._next_traj_id += 1
            self._trajs[traj.traj_id] = traj
            group.members.append(traj.traj_id)
            started.append(_copy(traj))
        self._groups[group.group_id] = group
        self._num_in_flight += self._group_size
        self._counters["groups_started"] += 1
        self._counters["trajectories_started"] += self._group_size
        return started

    def _drop_group(self, group_id: int, cause: str) -> list[int]:
        """Forget a group that will not train; return its members the engines must stop."""
        group = self._groups.pop(group_id)
        members = [self._trajs.pop(m) for m in group.members]
        cancelled = [t.traj_id for t in members if not t.finished]
        self._num_in_flight -= len(cancelled)
        self._counters[f"groups_dropped_{cause}"] += 1
        self._counters["trajectories_dropped"] += len(members)
        self._counters["trajectories_cancelled"] += len(cancelled)
        self._counters["tokens_dropped"] += sum(t.num_response_tokens for t in members)
        if self._requeue_dropped:
            self._requeued.append(group.prompt)
            self._counters["prompts_requeued"] += 1
        else:
            self._counters["prompts_discarded"] += 1
        return cancelled

    def _take_complete(self, budget: int | None) -> list[list[Trajectory]]:
        """Pop complete groups in completion order until their tokens reach `budget` (None: all)."""
        groups, tokens = [], 0
        while self._complete and (budget is None or tokens < budget):
            group = self._groups.pop(self._complete.popleft())
            members = [self._trajs.pop(m) for m in group.members]
            tokens += sum(t.num_response_tokens for t in members)
            groups.append(members)
        self._complete_tokens -= tokens
        self._counters["groups_trained"] += len(groups)
        self._counters["trajectories_trained"] += len(groups) * self._group_size
        self._counters["tokens_trained"] += tokens
        return groups

    def _end_step(self, groups: list[list[Trajectory]], cancelled: list[int]) -> Batch:
        batch = Batch(version=self.version, groups=groups, cancelled=cancelled)
        self.version += 1
        self._counters["steps"] += 1
        return batch

    def _group_tokens(self, group: _Group) -> int:
        return sum(self._trajs[m].num_response_tokens for m in group.members)

    # -- checkpointing --------------------------------------------------------------------

    def _config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The whole scheduler state as plain data (msgpack/JSON-safe; lists keep order)."""
        return {
            "kind": self._kind,
            "config": self._config_dict(),
            "version": self.version,
            "next_traj_id": self._next_traj_id,
            "next_group_id": self._next_group_id,
            "trajectories": [t.to_dict() for t in self._trajs.values()],
            "groups": [
                {"group_id": g.group_id, "prompt": g.prompt.to_dict(), "members": list(g.members)}
                for g in self._groups.values()
            ],
            "complete": list(self._complete),
            "requeued": [p.to_dict() for p in self._requeued],
            "counters": dict(self._counters),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` exactly. The config must equal this scheduler's.

        Raises ValueError on a different kind or config, or inconsistent state.
        """
        if state.get("kind") != self._kind:
            raise ValueError(
                f"load_state_dict: state is for a {state.get('kind')!r} scheduler, this is {self._kind!r}"
            )
        # A field added since the checkpoint was written counts at its default.
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        if defaults | state["config"] != self._config_dict():
            raise ValueError(f"load_state_dict: config {state['config']} differs from {self._config_dict()}")
        trajs = [Trajectory.from_dict(t) for t in state["trajectories"]]
        groups = [
            _Group(int(g["group_id"]), Prompt.from_dict(g["prompt"]), [int(m) for m in g["members"]])
            for g in state["groups"]
        ]
        self.version = int(state["version"])
        self._next_traj_id = int(state["next_traj_id"])
        self._next_group_id = int(state["next_group_id"])
        self._trajs = {t.traj_id: t for t in sorted(trajs, key=lambda t: t.traj_id)}
        self._groups = {g.group_id: g for g in sorted(groups, key=lambda g: g.group_id)}
        self._complete = deque(int(g) for g in state["complete"])
        self._requeued = deque(Prompt.from_dict(p) for p in state["requeued"])
        self._counters = dict.fromkeys(_COUNTERS, 0) | {k: int(v) for k, v in state["counters"].items()}
        self._load_extra_state(state)
        self._check_consistent()
        self._num_in_flight = sum(not t.finished for t in self._trajs.values())
        self._complete_tokens = sum(self._group_tokens(self._groups[g]) for g in self._complete)

    def _check_consistent(self) -> None:
        members = [m for g in self._groups.values() for m in g.members]
        if sorted(members) != sorted(self._trajs) or len(set(members)) != len(members):
            raise ValueError("load_state_dict: group members and trajectories do not match one to one")
        for g in self._groups.values():
            if len(g.members) != self._group_size:
                raise ValueError(f"load_state_dict: group {g.group_id} has {len(g.members)} members")
            if any(self._trajs[m].group_id != g.group_id for m in g.members):
                raise ValueError(f"load_state_dict: group {g.group_id} lists a trajectory of another group")
        for gid in self._complete:
            if gid not in self._groups or not all(self._trajs[m].finished for m in self._groups[gid].members):
                raise ValueError(f"load_state_dict: group {gid} is listed complete but is not")
        if any(t.finish_reason is FinishReason.ABORTED for t in self._trajs.values()):
            raise ValueError("load_state_dict: an aborted trajectory cannot be live")
        if self._trajs and max(self._trajs) >= self._next_traj_id:
            raise ValueError("load_state_dict: next_traj_id is not above every live trajectory id")


class C3POScheduler(_RolloutPool):
    """C3PO++: steps close on a token budget; unfinished rollouts carry over up to sigma steps.

    See the module docstring for the algorithm and the choices it makes.
    """

    _kind = "c3po"
    overlaps_training = True  # the engines decode the next steps while the trainer trains

    def __init__(self, config: C3POConfig) -> None:
        super().__init__(config.group_size, config.requeue_dropped)
        self.config = config

    def admit(self, prompts: Iterator[Prompt]) -> list[Trajectory]:
        """Start whole groups while G inference slots are free and the budget is not met
        (with `train_capacity`: while G more live rollouts fit in Omega_train).

        Requeued prompts go first, then `prompts` is advanced once per new group (never
        further). Returns copies of the new trajectories (ids, prompt tokens) to decode.
        """
        started: list[Trajectory] = []
        while self._may_admit():
            prompt = self._next_prompt(prompts)
            if prompt is None:
                break
            started += self._start_group(prompt)
        return started

    def _may_admit(self) -> bool:
        g, config = self.config.group_size, self.config
        if self._num_in_flight + g > config.infer_capacity:
            return False
        if config.train_capacity is None:
            return not self.ready()
        # Decoding ahead, bounded by Omega_train; and never a stall: a pool too small to
        # ever reach Phi still admits once nothing is left decoding.
        return len(self._trajs) + g <= config.train_capacity or (self._num_in_flight == 0 and not self.ready())

    def ready(self) -> bool:
        """True when complete groups hold at least Phi response tokens (C >= Phi)."""
        return self._complete_tokens >= self.config.token_budget

    def take_batch(self, force: bool = False) -> Batch:
        """End the step: take the batch, carry the unfinished rollouts over, version + 1.

        The batch is the shortest run of complete groups, in completion order, whose tokens
        reach Phi. With `force` (e.g. to drain at the end of the data) it is every complete
        group, however few tokens they hold. At the step end, each unfinished rollout
        whose retention is already sigma is dropped with its group (ids in
        `Batch.cancelled`); every other unfinished rollout gets retention + 1.
        Raises RuntimeError if not `ready()` and not `force`.
        """
        if not force and not self.ready():
            raise RuntimeError(
                f"take_batch: budget not met: {self._complete_tokens} of {self.config.token_budget} "
                f"tokens in complete groups (use force=True to end the step anyway)"
            )
        groups = self._take_complete(None if force else self.config.token_budget)
        return self._end_step(groups, self._carry_over())

    def _carry_over(self) -> list[int]:
        unfinished = [t for t in self._trajs.values() if not t.finished]
        expired = dict.fromkeys(t.group_id for t in unfinished if t.retention >= self.config.retention_limit)
        for traj in unfinished:
            if traj.group_id not in expired:
                traj.retention += 1
        return [tid for gid in expired for tid in self._drop_group(gid, "retention")]

    def _config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


class SyncScheduler(_RolloutPool):
    """The synchronous baseline: start a fixed set of groups, train when all have finished.

    Same interface as C3POScheduler. A step admits `groups_per_step` prompts once, at its
    start, and `ready()` turns true only when none of its rollouts is still decoding.
    Nothing is carried over: `take_batch(force=True)` before then drops the unfinished
    groups (counted as groups_dropped_unfinished). `overlaps_training` is False: a step
    starts once the last one's weights reached the engines, so the engines idle while the
    trainer trains and every token is sampled by the weights it is trained against.
    """

    _kind = "sync"
    overlaps_training = False

    def __init__(self, config: SyncConfig) -> None:
        super().__init__(config.group_size, config.requeue_dropped)
        self.config = config
        self._step_started = False

    def admit(self, prompts: Iterator[Prompt]) -> list[Trajectory]:
        """At the first call of a step, start `groups_per_step` groups (fewer if `prompts`
        runs dry); afterwards, until `take_batch`, start nothing."""
        if self._step_started:
            return []
        started: list[Trajectory] = []
        for _ in range(self.config.groups_per_step):
            prompt = self._next_prompt(prompts)
            if prompt is None:
                break
            started += self._start_group(prompt)
        self._step_started = bool(started)
        return started

    def ready(self) -> bool:
        """True once the step's rollouts have all ended (and at least one group started)."""
        return self._step_started and self._num_in_flight == 0

    def take_batch(self, force: bool = False) -> Batch:
        """End the step: every complete group trains, version + 1.

        Raises RuntimeError if rollouts are still decoding, unless `force`, which drops
        their groups (ids in `Batch.cancelled`).
        """
        if not force and not self.ready():
            raise RuntimeError(
                f"take_batch: {self._num_in_flight} rollouts still decoding (use force=True to drop them)"
            )
        groups = self._take_complete(None)
        unfinished = dict.fromkeys(t.group_id for t in self._trajs.values() if not t.finished)
        cancelled = [tid for gid in unfinished for tid in self._drop_group(gid, "unfinished")]
        self._step_started = False
        return self._end_step(groups, cancelled)

    def _config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def _extra_state(self) -> dict[str, Any]:
        return {"step_started": self._step_started}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._step_started = bool(state["step_started"])


def _copy(traj: Trajectory) -> Trajectory:
    # Callers get copies: a controller that edits what it was handed must not corrupt the pool.
    # (Spelled out rather than dataclasses.replace, which costs several times more per call.)
    return Trajectory(
        traj.traj_id, traj.group_id, traj.prompt_id, traj.sample_index, list(traj.prompt_tokens),
        list(traj.response_tokens), list(traj.infer_logprobs), list(traj.versions),
        traj.reward, traj.finish_reason, traj.retention,
    )


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
