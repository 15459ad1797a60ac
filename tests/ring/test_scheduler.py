"""Rollout schedulers: C3PO++ budget, groups, carry-over and retention; the synchronous
baseline; checkpoints. The last part checks the invariants under random event orders."""

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ring.scheduler import Batch, C3POConfig, C3POScheduler, SyncConfig, SyncScheduler
from ring.trajectory import FinishReason, Prompt


class Prompts:
    """The prompt source a controller would pass: p0, p1, ... ; `next_index` is its position."""

    def __init__(self, start: int = 0) -> None:
        self.next_index = start

    def __iter__(self):
        return self

    def __next__(self) -> Prompt:
        i = self.next_index
        self.next_index += 1
        return Prompt(f"p{i}", (i, i + 1))


def decode(s, traj_id, n, version=None):
    s.on_tokens(traj_id, [1] * n, [-0.5] * n, s.version if version is None else version)


def finish(s, traj_id, n, reason="eos", reward=1.0):
    if n:
        decode(s, traj_id, n)
    return s.on_finished(traj_id, reason, reward)


def c3po(group_size=2, infer_capacity=6, token_budget=10, retention_limit=2, requeue_dropped=False,
          train_capacity=None):
    return C3POScheduler(C3POConfig(group_size, infer_capacity, token_budget, retention_limit, requeue_dropped,
                                    train_capacity))


def ids(trajectories):
    return [t.traj_id for t in trajectories]


# -- C3PO++: the budget -------------------------------------------------------------------


def test_step_closes_as_soon_as_complete_groups_reach_the_budget():
    s, prompts = c3po(token_budget=10), Prompts()
    assert ids(s.admit(prompts)) == [0, 1, 2, 3, 4, 5]  # 3 groups of 2
    finish(s, 0, 4)
    assert not s.ready() and s.complete_tokens == 0  # its sibling is still decoding
    finish(s, 1, 3)
    assert not s.ready() and s.complete_tokens == 7
    finish(s, 2, 2)
    finish(s, 3, 2)
    assert s.ready() and s.complete_tokens == 11
    assert s.admit(prompts) == []  # the report refills only while C < Phi
    finish(s, 4, 5)
    finish(s, 5, 5)  # completes after the budget was met
    batch = s.take_batch()
    assert [ids(g) for g in batch.groups] == [[0, 1], [2, 3]]
    assert batch.num_tokens == 11 and batch.version == 0 and s.version == 1
    # The third group waits for the next step and already counts towards its budget.
    assert s.complete_tokens == 10 and s.ready()
    assert [ids(g) for g in s.take_batch().groups] == [[4, 5]]


def test_a_budget_met_exactly_closes_the_batch_there():
    s = c3po(group_size=1, infer_capacity=3, token_budget=5)
    s.admit(Prompts())
    finish(s, 0, 2)
    finish(s, 1, 3)
    finish(s, 2, 1)
    assert ids(s.take_batch().trajectories) == [0, 1]
    assert s.complete_tokens == 1


def test_take_batch_refuses_before_the_budget_unless_forced():
    s = c3po(token_budget=100)
    s.admit(Prompts())
    finish(s, 0, 3)
    finish(s, 1, 3)
    with pytest.raises(RuntimeError, match="6 of 100 tokens"):
        s.take_batch()
    batch = s.take_batch(force=True)
    assert batch.num_tokens == 6 and s.version == 1


def test_admit_fills_whole_groups_and_pulls_one_prompt_per_group():
    s, prompts = c3po(group_size=2, infer_capacity=5), Prompts()
    assert len(s.admit(prompts)) == 4 and prompts.next_index == 2  # a third group needs 6 slots
    assert s.admit(prompts) == [] and prompts.next_index == 2
    finish(s, 0, 1)
    started = s.admit(prompts)
    assert [(t.prompt_id, t.sample_index, t.group_id) for t in started] == [("p2", 0, 2), ("p2", 1, 2)]
    assert started[0].prompt_tokens == [2, 3]
    assert s.num_in_flight == 5


def test_admit_stops_when_the_prompt_source_runs_dry():
    s = c3po()
    assert len(s.admit(iter([Prompt("only", (1,))]))) == 2
    assert s.admit(iter([])) == []


def test_with_a_training_pool_capacity_admission_goes_on_past_the_budget():
    s, prompts = c3po(group_size=2, infer_capacity=4, token_budget=4, train_capacity=8), Prompts()
    assert ids(s.admit(prompts)) == [0, 1, 2, 3]  # Omega_infer = 4
    finish(s, 0, 2)
    finish(s, 1, 2)
    assert s.ready()
    # C >= Phi, yet a group starts: 6 live rollouts fit in Omega_train = 8.
    assert ids(s.admit(prompts)) == [4, 5]
    finish(s, 2, 2)
    finish(s, 3, 2)
    assert ids(s.admit(prompts)) == [6, 7]  # 8 live: 4 waiting to train, 4 decoding
    finish(s, 4, 1)
    finish(s, 5, 1)
    assert s.admit(prompts) == []  # slots are free, but the pool is full
    assert ids(s.take_batch().trajectories) == [0, 1]
    assert ids(s.admit(prompts)) == [8, 9]  # a trained group makes room for one more
    assert s.admit(prompts) == []


def test_a_training_pool_too_small_for_the_budget_does_not_stall():
    s, prompts = c3po(group_size=2, infer_capacity=4, token_budget=10, train_capacity=2), Prompts()
    assert ids(s.admit(prompts)) == [0, 1]
    finish(s, 0, 2)
    assert s.admit(prompts) == []  # one rollout still decodes: it may yet reach Phi
    finish(s, 1, 2)
    assert not s.ready()
    assert ids(s.admit(prompts)) == [2, 3]  # nothing decodes and C < Phi: admit anyway
    assert s.admit(prompts) == []


# -- C3PO++: groups, carry-over, retention -------------------------------------------------------


def test_unfinished_rollouts_carry_over_with_retention_and_version_history():
    s, prompts = c3po(group_size=2, infer_capacity=4, token_budget=4), Prompts()
    s.admit(prompts)  # groups 0 = (0, 1) and 1 = (2, 3)
    finish(s, 0, 2)
    finish(s, 1, 2)
    decode(s, 2, 3)  # group 1 has decoded some tokens under version 0
    finish(s, 3, 1)  # ... and one member has finished
    batch = s.take_batch()
    assert ids(batch.trajectories) == [0, 1] and batch.cancelled == []
    retention = {t.traj_id: t.retention for t in s.in_flight() + s.waiting()}
    assert retention == {2: 1, 3: 0}  # only the unfinished one lived through the step end
    decode(s, 2, 2)  # continues under the new weights
    finish(s, 2, 0)
    batch = s.take_batch(force=True)
    traj = batch.groups[0][0]
    assert traj.versions == [0, 0, 0, 1, 1] and traj.versions_spanned() == [0, 1]
    assert traj.retention == 1 and batch.version == 1


def test_finished_member_waits_in_the_pool_until_its_group_completes():
    s = c3po(group_size=2, infer_capacity=2, token_budget=1, retention_limit=5)
    s.admit(Prompts())
    finish(s, 0, 5)
    for _ in range(3):
        assert not s.ready()
        s.take_batch(force=True)  # steps end without it
    assert ids(s.waiting()) == [0] and ids(s.in_flight()) == [1]
    finish(s, 1, 1)
    batch = s.take_batch()
    assert [ids(g) for g in batch.groups] == [[0, 1]]


def test_rollout_past_the_retention_limit_is_dropped_with_its_group():
    s, prompts = c3po(group_size=2, infer_capacity=2, token_budget=1, retention_limit=1), Prompts()
    s.admit(prompts)
    finish(s, 0, 4)  # finished, waiting for its sibling
    decode(s, 1, 3)
    assert s.take_batch(force=True).cancelled == []  # retention 0 -> 1
    batch = s.take_batch(force=True)  # retention would become 2 > sigma = 1
    assert batch.cancelled == [1]
    assert s.in_flight() == [] and s.waiting() == []
    c = s.counters()
    assert c["groups_dropped_retention"] == 1 and c["trajectories_dropped"] == 2
    assert c["trajectories_cancelled"] == 1 and c["tokens_dropped"] == 7
    assert c["prompts_discarded"] == 1 and c["prompts_requeued"] == 0
    # The slots are free again, and late events about the dropped ids are ignored.
    decode(s, 1, 1)
    assert s.on_finished(1, "eos") == []
    assert s.counters()["stale_events"] == 2
    assert [t.prompt_id for t in s.admit(prompts)] == ["p1", "p1"]


def test_retention_limit_zero_carries_nothing_over():
    s = c3po(group_size=1, infer_capacity=3, token_budget=2, retention_limit=0)
    s.admit(Prompts())
    finish(s, 0, 2)
    decode(s, 1, 1)
    batch = s.take_batch()
    assert ids(batch.trajectories) == [0] and batch.cancelled == [1, 2]


def test_requeued_prompt_restarts_first_as_a_new_group():
    s, prompts = c3po(group_size=2, infer_capacity=2, retention_limit=0, requeue_dropped=True), Prompts()
    s.admit(prompts)
    assert s.take_batch(force=True).cancelled == [0, 1]
    started = s.admit(prompts)
    assert [(t.prompt_id, t.group_id) for t in started] == [("p0", 1), ("p0", 1)]
    assert ids(started) == [2, 3]  # ids are never reused
    assert prompts.next_index == 1  # the source was not advanced for it
    assert s.counters()["prompts_requeued"] == 1


def test_aborted_response_drops_its_group_and_cancels_the_siblings():
    s, prompts = c3po(group_size=3, infer_capacity=3, requeue_dropped=True), Prompts()
    s.admit(prompts)
    finish(s, 1, 2)
    assert finish(s, 0, 1, reason="aborted") == [2]
    assert s.num_in_flight == 0 and s.waiting() == []
    c = s.counters()
    assert c["groups_dropped_aborted"] == 1 and c["trajectories_dropped"] == 3 and c["tokens_dropped"] == 3
    assert [t.prompt_id for t in s.admit(prompts)] == ["p0"] * 3


def test_events_that_cannot_be_right_raise():
    s = c3po()
    s.admit(Prompts())
    with pytest.raises(KeyError, match="never started"):
        decode(s, 99, 1)
    with pytest.raises(ValueError, match="newer"):
        decode(s, 0, 1, version=1)
    finish(s, 0, 1)
    with pytest.raises(ValueError, match="already finished"):
        s.on_finished(0, "eos")
    with pytest.raises(ValueError, match="after finish"):
        decode(s, 0, 1)
    with pytest.raises(ValueError):
        s.on_finished(1, "stop")


def test_tokens_from_an_older_version_are_accepted_after_a_step():
    # With training overlapping generation, the engine may still run old weights.
    s = c3po(group_size=1, infer_capacity=2, token_budget=1)
    s.admit(Prompts())
    finish(s, 0, 1)
    s.take_batch()
    decode(s, 1, 2, version=0)
    decode(s, 1, 1, version=1)
    assert s.in_flight()[0].versions == [0, 0, 1]


def test_callers_get_copies_not_the_pool():
    s = c3po()
    started = s.admit(Prompts())
    started[0].response_tokens.append(42)
    started[0].retention = 9
    traj = s.in_flight()[0]
    assert traj.response_tokens == [] and traj.retention == 0


def test_config_is_validated():
    with pytest.raises(ValueError, match="infer_capacity"):
        C3POConfig(group_size=4, infer_capacity=3, token_budget=1, retention_limit=0)
    with pytest.raises(ValueError, match="retention_limit"):
        C3POConfig(group_size=1, infer_capacity=3, token_budget=1, retention_limit=-1)
    with pytest.raises(ValueError, match="train_capacity"):
        C3POConfig(group_size=4, infer_capacity=4, token_budget=1, retention_limit=0, train_capacity=3)


# -- the synchronous schedule -----------------------------------------------------------------


def test_sync_waits_for_every_response_of_the_step():
    s, prompts = SyncScheduler(SyncConfig(group_size=2, groups_per_step=2)), Prompts()
    assert ids(s.admit(prompts)) == [0, 1, 2, 3]
    assert s.admit(prompts) == [] and prompts.next_index == 2
    for i, n in enumerate((1, 2, 3)):
        finish(s, i, n)
    assert not s.ready()
    with pytest.raises(RuntimeError, match="1 rollouts still decoding"):
        s.take_batch()
    finish(s, 3, 100)
    batch = s.take_batch()
    assert sorted(ids(batch.trajectories)) == [0, 1, 2, 3] and batch.num_tokens == 106
    assert ids(s.admit(prompts)) == [4, 5, 6, 7]


def test_sync_forced_step_end_drops_unfinished_groups():
    s = SyncScheduler(SyncConfig(group_size=2, groups_per_step=2))
    s.admit(Prompts())
    finish(s, 0, 1)
    finish(s, 1, 1)
    finish(s, 2, 1)
    batch = s.take_batch(force=True)
    assert ids(batch.trajectories) == [0, 1] and batch.cancelled == [3]
    assert s.counters()["groups_dropped_unfinished"] == 1


def test_sync_step_with_every_group_aborted_is_ready_and_empty():
    s = SyncScheduler(SyncConfig(group_size=2, groups_per_step=1))
    s.admit(Prompts())
    assert s.on_finished(0, FinishReason.ABORTED) == [1]
    assert s.ready() and s.take_batch().groups == []


# -- checkpoints ------------------------------------------------------------------------------


def test_state_round_trips_through_msgpack_and_resumes():
    s, prompts = c3po(token_budget=3, requeue_dropped=True), Prompts()
    s.admit(prompts)
    finish(s, 0, 2)
    finish(s, 1, 2)
    decode(s, 2, 1)
    finish(s, 4, 1, reason="aborted")  # its prompt is requeued
    s.take_batch()
    state = msgpack.unpackb(msgpack.packb(s.state_dict()))
    restored = c3po(token_budget=3, requeue_dropped=True)
    restored.load_state_dict(state)
    assert restored.state_dict() == s.state_dict()
    assert [t.to_dict() for t in restored.in_flight()] == [t.to_dict() for t in s.in_flight()]
    resumed = restored.admit(Prompts(prompts.next_index))
    assert [t.prompt_id for t in resumed] == ["p2", "p2", "p3", "p3"]  # the requeued one first
    assert [t.to_dict() for t in resumed] == [t.to_dict() for t in s.admit(prompts)]


def test_state_for_another_config_or_kind_is_refused():
    state = c3po(token_budget=3).state_dict()
    with pytest.raises(ValueError, match="config"):
        c3po(token_budget=4).load_state_dict(state)
    with pytest.raises(ValueError, match="'c3po' scheduler"):
        SyncScheduler(SyncConfig(2, 1)).load_state_dict(state)


def test_inconsistent_state_is_refused():
    s = c3po()
    s.admit(Prompts())
    state = s.state_dict()
    state["groups"][0]["members"] = [0, 2]
    with pytest.raises(ValueError, match="one to one|another group"):
        c3po().load_state_dict(state)


def test_batch_round_trips_as_plain_data():
    s = c3po(token_budget=1)
    s.admit(Prompts())
    finish(s, 0, 1, reward=0.0)
    finish(s, 1, 2, reason="length", reward=1.0)
    batch = s.take_batch()
    data = msgpack.unpackb(msgpack.packb(batch.to_dict()))
    assert Batch.from_dict(data) == batch


# -- invariants under random event orders -------------------------------------------------------

# Weighted towards decoding and finishing, so that groups complete, steps end and
# retention limits bite within a few dozen events.
OPS = st.one_of(
    st.tuples(st.just("admit")),
    st.tuples(st.just("tokens"), st.integers(0, 63), st.integers(1, 4)),
    st.tuples(st.just("tokens"), st.integers(0, 63), st.integers(1, 4)),
    st.tuples(st.just("finish"), st.integers(0, 63), st.sampled_from(["eos", "eos", "length"]), st.integers(0, 1)),
    st.tuples(st.just("finish"), st.integers(0, 63), st.sampled_from(["eos", "length", "aborted"]), st.integers(0, 1)),
    st.tuples(st.just("take"), st.sampled_from([False, False, True])),
    st.tuples(st.just("stale"), st.integers(0, 63)),
)


@st.composite
def c3po_configs(draw):
    g = draw(st.integers(1, 3))
    return C3POConfig(
        group_size=g,
        infer_capacity=g * draw(st.integers(1, 3)) + draw(st.integers(0, g - 1)),
        token_budget=draw(st.integers(1, 15)),
        retention_limit=draw(st.integers(0, 3)),
        requeue_dropped=draw(st.booleans()),
        train_capacity=draw(st.one_of(st.none(), st.integers(g, 6 * g))),
    )


sync_configs = st.builds(SyncConfig, st.integers(1, 3), st.integers(1, 3), st.booleans())


def make_scheduler(config):
    return C3POScheduler(config) if isinstance(config, C3POConfig) else SyncScheduler(config)


def token_at(traj_id, position):
    return (traj_id * 1000 + position) % 50_000


class Harness:
    """Drives a scheduler with abstract ops, choosing targets only from its public state,
    so two schedulers in the same state receive the same calls. Returns what it observed."""

    def __init__(self, scheduler, prompts):
        self.s, self.prompts = scheduler, prompts

    def pick(self, index):
        live = self.s.in_flight()
        return live[index % len(live)] if live else None

    def apply(self, op):
        s, kind = self.s, op[0]
        if kind == "admit":
            return ("admit", [t.to_dict() for t in s.admit(self.prompts)])
        if kind == "tokens":
            traj = self.pick(op[1])
            if traj is None:
                return ("tokens", None)
            start = traj.num_response_tokens
            tokens = [token_at(traj.traj_id, start + j) for j in range(op[2])]
            s.on_tokens(traj.traj_id, tokens, [-0.1 * (p % 7) for p in range(start, start + op[2])], s.version)
            return ("tokens", traj.traj_id, op[2])
        if kind == "finish":
            traj = self.pick(op[1])
            if traj is None:
                return ("finish", None)
            return ("finish", traj.traj_id, op[2], s.on_finished(traj.traj_id, op[2], float(op[3])))
        if kind == "take":
            if not op[1] and not s.ready():
                with pytest.raises(RuntimeError):
                    s.take_batch()
                return ("take", "refused")
            return ("take", s.take_batch(force=op[1]).to_dict())
        live = {t.traj_id for t in s.in_flight() + s.waiting()}
        dead = [i for i in range(s.counters()["trajectories_started"]) if i not in live]
        if dead:
            s.on_tokens(dead[op[1] % len(dead)], [0], [0.0], s.version)
        return ("stale", s.counters()["stale_events"])


class Model:
    """What a user expects, tracked independently of the scheduler's internals."""

    def __init__(self, config):
        self.config = config
        self.group_of, self.members = {}, {}  # traj -> group, group -> [traj]
        self.tokens, self.finished, self.reward = {}, set(), {}
        self.admitted_at = {}  # group -> scheduler version at admission
        self.complete = []  # group ids in completion order, not yet trained
        self.trained, self.dropped = set(), set()
        self.step_groups = []  # sync: groups admitted in the current step

    def group_tokens(self, gid):
        return sum(self.tokens[t] for t in self.members[gid])

    def drop_group(self, gid):
        event("a group was dropped")
        assert not (set(self.members[gid]) & (self.trained | self.dropped))
        self.dropped |= set(self.members[gid])
        if gid in self.step_groups:
            self.step_groups.remove(gid)

    def observe(self, s, op, out, version_before):
        kind = out[0]
        if kind == "admit":
            self.check_admission_stopped(s)
            for t in out[1]:
                assert t["traj_id"] not in self.group_of, "trajectory id reused"
                self.group_of[t["traj_id"]] = t["group_id"]
                self.members.setdefault(t["group_id"], []).append(t["traj_id"])
                self.tokens[t["traj_id"]] = 0
                self.admitted_at[t["group_id"]] = version_before
                if t["group_id"] not in self.step_groups:
                    self.step_groups.append(t["group_id"])
        elif kind == "tokens" and out[1] is not None:
            self.tokens[out[1]] += out[2]
        elif kind == "finish" and out[1] is not None:
            tid, reason, cancelled = out[1], out[2], out[3]
            gid = self.group_of[tid]
            if reason == "aborted":
                unfinished = [m for m in self.members[gid] if m != tid and m not in self.finished]
                assert cancelled == unfinished
                self.drop_group(gid)
            else:
                assert cancelled == []
                self.finished.add(tid)
                self.reward[tid] = float(op[3])
                if all(m in self.finished for m in self.members[gid]):
                    self.complete.append(gid)
        elif kind == "take" and out[1] != "refused":
            event("a step ended with a non-empty batch" if out[1]["groups"] else "a step ended empty")
            self.check_batch(Batch.from_dict(out[1]), forced=op[1], version=version_before)

    def check_admission_stopped(self, s):
        """`admit` (with prompts to spare) stops exactly where the rules say."""
        g, live = self.config.group_size, len(s.in_flight() + s.waiting())
        if not isinstance(self.config, C3POConfig) or s.num_in_flight + g > self.config.infer_capacity:
            return
        if self.config.train_capacity is None:
            assert s.ready()
        else:
            assert live + g > self.config.train_capacity and (s.num_in_flight > 0 or s.ready())

    def check_batch(self, batch, forced, version):
        g = self.config.group_size
        assert batch.version == version
        gids = [group[0].group_id for group in batch.groups]
        # Complete groups leave in the order they completed; the budget cuts the prefix.
        assert gids == self.complete[: len(gids)]
        if isinstance(self.config, C3POConfig):
            if forced:
                assert len(gids) == len(self.complete)
            else:
                assert batch.num_tokens >= self.config.token_budget
                last = sum(t.num_response_tokens for t in batch.groups[-1])
                assert batch.num_tokens - last < self.config.token_budget
        else:
            assert set(gids) == {gid for gid in self.step_groups if gid in self.complete}
        self.complete = self.complete[len(gids):]
        for group in batch.groups:
            assert [t.sample_index for t in group] == list(range(g))
            assert ids(group) == self.members[group[0].group_id]
            for t in group:
                assert t.traj_id not in self.trained and t.traj_id not in self.dropped
                assert t.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
                assert t.reward == self.reward[t.traj_id]
                # No token lost, duplicated or reordered.
                assert t.response_tokens == [token_at(t.traj_id, p) for p in range(self.tokens[t.traj_id])]
                assert all(v <= batch.version for v in t.versions)
                self.trained.add(t.traj_id)
        for gid in dict.fromkeys(self.group_of[c] for c in batch.cancelled):
            unfinished = [m for m in self.members[gid] if m not in self.finished]
            assert [c for c in batch.cancelled if self.group_of[c] == gid] == unfinished
            self.drop_group(gid)
        self.step_groups = []

    def check_state(self, s):
        live_trajs = s.in_flight() + s.waiting()
        live = ids(live_trajs)
        assert len(live) == len(set(live))
        started = set(self.group_of)
        # Every started trajectory is in exactly one place.
        assert not (self.trained & self.dropped)
        assert set(live).isdisjoint(self.trained | self.dropped)
        assert started == set(live) | self.trained | self.dropped
        assert set(ids(s.in_flight())) == started - self.finished - self.trained - self.dropped
        c = s.counters()
        assert c["trajectories_started"] == len(started)
        assert c["trajectories_trained"] == len(self.trained)
        assert c["trajectories_dropped"] == len(self.dropped)
        assert c["tokens_trained"] == sum(self.tokens[t] for t in self.trained)
        complete_tokens = sum(self.group_tokens(gid) for gid in self.complete)
        assert s.complete_tokens == complete_tokens
        if isinstance(self.config, C3POConfig):
            assert s.ready() == (complete_tokens >= self.config.token_budget)
            assert s.num_in_flight <= self.config.infer_capacity
            if self.config.train_capacity is not None:  # beyond it only by the no-stall rule
                assert len(live) <= max(self.config.train_capacity, len(s.waiting()) + self.config.infer_capacity)
            for t in live_trajs:
                assert t.retention <= self.config.retention_limit
            for t in s.in_flight():  # retention = step ends lived through unfinished
                assert t.retention == s.version - self.admitted_at[t.group_id]
        else:
            assert s.num_in_flight <= self.config.group_size * self.config.groups_per_step


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(config=st.one_of(c3po_configs(), sync_configs), ops=st.lists(OPS, min_size=10, max_size=120))
def test_invariants_hold_under_random_event_orders(config, ops):
    s = make_scheduler(config)
    harness, model = Harness(s, Prompts()), Model(config)
    for op in ops:
        version = s.version
        model.observe(s, op, harness.apply(op), version)
        model.check_state(s)


@SETTINGS
@given(config=st.one_of(c3po_configs(), sync_configs), ops=st.lists(OPS, min_size=10, max_size=120), data=st.data())
def test_restored_scheduler_behaves_exactly_like_the_original(config, ops, data):
    cut = data.draw(st.integers(0, len(ops)), label="cut")
    original, prompts = make_scheduler(config), Prompts()
    a = Harness(original, prompts)
    for op in ops[:cut]:
        a.apply(op)
    restored = make_scheduler(config)
    restored.load_state_dict(msgpack.unpackb(msgpack.packb(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    b = Harness(restored, Prompts(prompts.next_index))
    for op in ops[cut:]:
        assert b.apply(op) == a.apply(op)
    assert restored.state_dict() == original.state_dict()
    assert restored.counters() == original.counters()
