"""Weight sync (asystem/weights.py): real processes, a real gloo group, real actors.

The test process is the trainer (rank 0) unless a test says otherwise; engines are `Peer`
child processes (tests/asystem/weights_peers.py) that report digests of what they received.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from actors import ActorSystem
from asystem.models import tiny_llama
from asystem.weights import (
    ALIGN,
    BucketPlan,
    WeightGroup,
    WeightReceiver,
    WeightSender,
    WeightStaging,
    WeightSyncError,
    WeightSyncSpec,
    free_port,
    push_over_actors,
)
from tests.asystem.weights_peers import (
    Peer,
    WeightHolder,
    digests,
    stop_fork_server,
    synthetic_state,
)

pytestmark = pytest.mark.timeout(90)

SLACK = 10.0  # seconds beyond a deadline that a failure may take to surface on a loaded machine


def model_state(scale: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    """tiny_llama's fp32 weights, their bf16 copies, and the odd cases: a non-contiguous
    tensor, a 0-d one, an empty one, bool and int64."""
    fp32 = [(name, t * scale) for name, t in load_file(tiny_llama() / "model.safetensors").items()]
    return fp32 + [(f"bf16.{name}", t.to(torch.bfloat16)) for name, t in fp32] + [
        ("odd.transposed", fp32[-1][1].reshape(-1, 8).t()),
        ("odd.scalar", torch.tensor(scale)),
        ("odd.empty", torch.empty(0, 3)),
        ("odd.mask", torch.arange(10) % 3 == 0),
        ("odd.positions", torch.arange(7, dtype=torch.int64) * int(scale)),
    ]


def spec(world_size: int, timeout_s: float = 20.0) -> WeightSyncSpec:
    return WeightSyncSpec("127.0.0.1", free_port(), world_size, timeout_s=timeout_s)


def join_all(spec_: WeightSyncSpec, peers: list[Peer]) -> WeightGroup:
    """Join as rank 0 while the peers join as ranks 1, 2, ..."""
    for rank, peer in enumerate(peers, start=1):
        peer.call("join", spec=spec_.to_dict(), rank=rank)
    group = WeightGroup.join(spec_, 0)
    for peer in peers:
        peer.ok()
    return group


@pytest.fixture(scope="module", autouse=True)
def _fork_server():
    yield
    stop_fork_server()


@pytest.fixture
def peers(request):
    """`request.param` child processes, stopped (or killed) after the test."""
    started = [Peer() for _ in range(request.param)]
    yield started
    for peer in started:
        peer.stop()


@pytest.fixture(scope="module")
def engines():
    """Two engine processes that already hold a default process group of their own, joined
    to a weight group with this process as rank 0."""
    started = [Peer(), Peer()]
    port = free_port()
    try:
        for rank, peer in enumerate(started):
            peer.call("default_group", port=port, rank=rank, world_size=2)
        for peer in started:
            peer.ok()
        group = join_all(spec(3), started)
        yield group, started
        group.close()
    finally:
        for peer in started:
            peer.stop()


def send_and_receive(group, peers, plan, state, timeout=20.0, peer_plan=None):
    for peer in peers:
        peer.call("receive", plan=(peer_plan or plan).to_dict(), timeout=timeout)
    try:
        stats = WeightSender(group).send(plan, state, timeout)
    finally:
        replies = [peer.reply() for peer in peers]
    return stats, replies


# --- the plan -------------------------------------------------------------------------


def test_plan_packs_in_order_and_round_trips_bit_identical():
    state = model_state()
    plan = BucketPlan.build(7, state, bucket_bytes=64 << 10)
    assert len(plan.buckets) > 3
    assert [m.name for b in plan.buckets for m in b] == [name for name, _ in state]
    for index, bucket in enumerate(plan.buckets):
        assert len(bucket) == 1 or plan.bucket_nbytes(index) <= 64 << 10
        assert all(m.offset % ALIGN == 0 for m in bucket)
    assert BucketPlan.from_dict(plan.to_dict()) == plan
    assert BucketPlan.from_dict(plan.to_dict()).digest == plan.digest

    tensors = plan.match(state)
    unpacked = []
    for index in range(len(plan.buckets)):
        buffer = plan.pack(index, tensors, torch.empty(plan.bucket_nbytes(index) + 100, dtype=torch.uint8))
        unpacked += plan.unpack(index, buffer.clone())
    assert digests(unpacked) == digests(state)
    assert plan.total_bytes >= sum(t.numel() * t.element_size() for _, t in state)


def test_tensors_that_do_not_match_the_plan_are_refused():
    state = model_state()
    plan = BucketPlan.build(1, state)
    with pytest.raises(ValueError, match="missing .'odd.mask'"):
        plan.match([p for p in state if p[0] != "odd.mask"])
    with pytest.raises(ValueError, match="odd.scalar.*torch.float64"):
        plan.match([(n, t.double() if n == "odd.scalar" else t) for n, t in state])


def _meta(**change) -> dict:
    fields = {"name": "w", "shape": [2, 3], "dtype": "float32", "offset": 0, "numel": 6}
    return fields | change


@pytest.mark.parametrize(("bucket", "message"), [
    ([_meta(dtype="float128")], "dtype must be one of"),
    ([_meta(dtype=7)], "dtype must be one of"),
    ([_meta(offset=-64)], "offset must be a multiple of 64 >= 0"),
    ([_meta(offset=3)], "offset must be a multiple of 64"),
    ([_meta(offset=1 << 40)], "offset must be 0"),
    ([_meta(), _meta(name="v", offset=0)], "'v' offset must be 64"),
    ([_meta(), _meta(name="v", offset=128)], "'v' offset must be 64"),
    ([_meta(numel=7)], "numel must be the product of its shape"),
    ([_meta(shape=[-1, 3], numel=-3)], "shape must be at most 64 ints >= 0"),
    ([_meta(shape="23")], "shape must be a list of ints"),
    ([_meta(), _meta(offset=64)], "unique names"),
    ([_meta(extra=1)], "dict has the keys"),
    ([], "at least one tensor"),
])
def test_bad_plans_raise_clear_value_errors(bucket, message):
    with pytest.raises(ValueError, match=message):
        BucketPlan.from_dict({"version": 1, "buckets": [bucket]})


@pytest.mark.parametrize(("data", "message"), [
    ({"version": True, "buckets": []}, "version must be an int >= 0"),
    ({"version": -1, "buckets": []}, "version must be an int >= 0"),
    ({"version": 1}, "exactly the keys"),
    ({"version": 1, "buckets": {"0": []}}, "list of lists"),
    ([1, 2], "exactly the keys"),
])
def test_bad_plan_dicts_raise_clear_value_errors(data, message):
    with pytest.raises(ValueError, match=message):
        BucketPlan.from_dict(data)


def test_spec_travels_as_a_dict_and_checks_its_fields():
    spec_ = WeightSyncSpec("10.0.0.1", 29500, 4, backend="nccl", timeout_s=5)
    assert WeightSyncSpec.from_dict(spec_.to_dict()) == spec_
    with pytest.raises(ValueError, match="backend"):
        WeightSyncSpec("h", 1, 2, backend="mpi")
    with pytest.raises(ValueError, match="keys"):
        WeightSyncSpec.from_dict({"host": "h", "port": 1, "world_size": 2, "rank": 0})


# --- the group ------------------------------------------------------------------------


def test_a_trainer_whose_engines_never_join_gets_an_error_at_the_join_deadline():
    spec_ = spec(2, timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=rf"{spec_.address}: rank 0 of 2 could not join within 2.0s"):
        WeightGroup.join(spec_, 0)
    assert time.monotonic() - start < 2.0 + SLACK


def test_broadcast_to_two_engines_is_bit_identical_and_versioned(engines):
    group, peers = engines
    for version, scale in [(1, 1.0), (2, -3.0)]:
        state = model_state(scale)
        plan = BucketPlan.build(version, state, bucket_bytes=64 << 10)
        stats, replies = send_and_receive(group, peers, plan, state)
        for reply in replies:
            assert reply["ok"]["version"] == version
            assert reply["ok"]["digests"] == digests(state)
        assert stats.buckets == len(plan.buckets) > 3
        assert 0 < stats.packed_bytes < stats.bytes  # the embeddings went from their own memory


def test_engines_holding_another_plan_refuse_and_the_group_stays_usable(engines):
    group, peers = engines
    state = model_state()
    plan = BucketPlan.build(11, state, bucket_bytes=1 << 20)
    stale = BucketPlan.build(10, state, bucket_bytes=1 << 20)
    with pytest.raises(WeightSyncError, match=r"version 11 .* refused: rank 1 holds plan version 10"):
        send_and_receive(group, peers, plan, state, peer_plan=stale)
    # The engines raised too, and nothing was sent.
    _, replies = send_and_receive(group, peers, plan, state)
    assert [r["ok"]["version"] for r in replies] == [11, 11]


def test_a_trainer_whose_tensors_do_not_match_its_plan_fails_every_rank(engines):
    group, peers = engines
    state = model_state()
    plan = BucketPlan.build(12, state)
    for peer in peers:
        peer.call("receive", plan=plan.to_dict(), timeout=20)
    with pytest.raises(ValueError, match="missing"):
        WeightSender(group).send(plan, state[1:], 20)
    for peer in peers:
        reply = peer.reply()
        assert reply["error"] == "WeightSyncError" and "rank 0 rejected its input" in reply["message"]
    assert group.broken is None


def test_the_weight_group_is_independent_of_the_default_group(engines):
    group, peers = engines
    # The engines' default group (ranks 0 and 1) and the weight group (ranks 1 and 2) live
    # side by side: each works before and after an update on the other.
    for value, peer in zip([5, 7], peers):
        peer.call("default_all_reduce", value=value)
    assert [p.ok()["sum"] for p in peers] == [12, 12]
    state = model_state(0.5)
    _, replies = send_and_receive(group, peers, BucketPlan.build(20, state), state)
    assert all(r["ok"]["digests"] == digests(state) for r in replies)
    for value, peer in zip([1, 2], peers):
        peer.call("default_all_reduce", value=value)
    assert [p.ok()["sum"] for p in peers] == [3, 3]


def test_an_engine_that_keeps_its_tensors_never_sees_them_overwritten():
    # Both ranks in this process (two threads): this is about the receiver's buffers.
    spec_ = spec(2)
    with ThreadPoolExecutor(1) as trainer:
        joined = trainer.submit(WeightGroup.join, spec_, 0)
        engine_group = WeightGroup.join(spec_, 1)
        trainer_group = joined.result(timeout=30)

        def update(version: int, state):
            plan = BucketPlan.build(version, state, bucket_bytes=1 << 16)
            sent = trainer.submit(WeightSender(trainer_group).send, plan, state, 20)
            named = WeightReceiver(engine_group).receive(plan, 20)
            sent.result(timeout=30)
            return named

        state1, state2, state3 = (synthetic_state(seed, tensors=8, numel=1 << 14) for seed in (1, 2, 3))
        kept = update(1, state1)
        second = update(2, state2)
        assert digests(kept) == digests(state1)  # still version 1: v2 went to new memory
        assert digests(second) == digests(state2)
        second_memory = {t.untyped_storage().data_ptr() for _, t in second}
        del kept, second  # loaded and dropped: the next update reuses that memory
        third = update(3, state3)
        assert digests(third) == digests(state3)
        assert {t.untyped_storage().data_ptr() for _, t in third} == second_memory
        trainer_group.close()
        engine_group.close()


@pytest.mark.parametrize("peers", [2], indirect=True)
def test_an_engine_killed_mid_broadcast_fails_the_update_within_the_deadline(peers):
    victim, survivor = peers
    group = join_all(spec(3, timeout_s=20), peers)
    state = synthetic_state(seed=1, tensors=16, numel=1 << 18)  # 16 buckets of 512 KiB
    plan = BucketPlan.build(1, state, bucket_bytes=1 << 19)
    victim.call("receive", plan=plan.to_dict(), timeout=20, die_at=1)
    survivor.call("receive", plan=plan.to_dict(), timeout=20)
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as failure:
        WeightSender(group).send(plan, state, timeout=20)
    assert time.monotonic() - start < 20 + SLACK
    assert group.spec.address in str(failure.value) and "version 1" in str(failure.value)
    reply = survivor.reply()
    assert reply["error"] == "WeightSyncError", reply  # all or nothing: no tensors came back
    assert reply["seconds"] < 20  # told by the trainer closing its end, not by its own deadline
    victim.proc.join(5)
    assert victim.proc.exitcode == -signal.SIGKILL
    assert group.broken
    with pytest.raises(WeightSyncError, match="broken"):
        WeightSender(group).send(plan, state, timeout=20)
    group.close()
    survivor.call("close")
    survivor.ok()

    # A new group on a fresh port works with whoever is left.
    group = join_all(spec(2), [survivor])
    plan = BucketPlan.build(2, state, bucket_bytes=1 << 19)
    _, [reply] = send_and_receive(group, [survivor], plan, state)
    assert reply["ok"] == {"version": 2, "digests": digests(state)}
    group.close()


@pytest.mark.parametrize("peers", [2], indirect=True)
def test_an_engine_whose_trainer_dies_mid_broadcast_gets_nothing(peers):
    trainer, engine = peers
    spec_ = spec(2, timeout_s=20)
    trainer.call("join", spec=spec_.to_dict(), rank=0)
    engine.call("join", spec=spec_.to_dict(), rank=1)
    trainer.ok(), engine.ok()
    args = {"seed": 2, "tensors": 16, "numel": 1 << 18}
    plan = BucketPlan.build(1, synthetic_state(**args), bucket_bytes=1 << 19)
    engine.call("receive", plan=plan.to_dict(), timeout=20, stall_at=0)
    trainer.call("send_synthetic", plan=plan.to_dict(), timeout=20, **args)
    assert engine.reply() == {"at": 0}  # bucket 0 arrived; the trainer is mid-way
    os.kill(trainer.proc.pid, signal.SIGKILL)
    trainer.proc.join(5)
    engine.go()
    reply = engine.reply()
    assert reply["error"] == "WeightSyncError", reply
    assert spec_.address in reply["message"] and "version 1" in reply["message"]
    assert reply["seconds"] < 20 + SLACK


@pytest.mark.parametrize("peers", [2], indirect=True)
def test_a_hung_engine_fails_the_update_at_its_deadline(peers):
    hung, other = peers
    group = join_all(spec(3), peers)
    state = synthetic_state(seed=3, tensors=16, numel=1 << 18)
    plan = BucketPlan.build(1, state, bucket_bytes=1 << 19)
    hung.call("receive", plan=plan.to_dict(), timeout=30, stall_at=1)  # never told to go
    other.call("receive", plan=plan.to_dict(), timeout=30)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="deadline 3.0s"):
        WeightSender(group).send(plan, state, timeout=3.0)
    assert 3.0 - 0.5 < time.monotonic() - start < 3.0 + SLACK
    assert hung.reply() == {"at": 1}
    start = time.monotonic()
    group.close()  # the backend gave up at the deadline too: nothing left to wait for
    assert time.monotonic() - start < SLACK
    assert other.reply()["error"] == "WeightSyncError"
    hung.proc.kill()  # it still waits for its "go"


# --- the ZeroMQ path ------------------------------------------------------------------


async def test_weights_pushed_through_actors_arrive_whole_and_versioned():
    async with ActorSystem(default_timeout=20) as system:
        holder = await system.spawn(WeightHolder, where="process", timeout=30)
        for version, scale in [(1, 1.0), (2, 2.0)]:
            state = model_state(scale)
            plan = BucketPlan.build(version, state, bucket_bytes=64 << 10)
            stats = await push_over_actors(holder, plan, state, timeout=20)
            assert stats.buckets == len(plan.buckets) > 3
            assert await holder.ask("serving", timeout=10) == {"version": version, "digests": digests(state)}
        # A stale version is refused by the engine; it keeps serving version 2.
        with pytest.raises(WeightSyncError, match=r"version 1 to .*bucket 0.*stale"):
            await push_over_actors(holder, BucketPlan.build(1, state, bucket_bytes=64 << 10), state, timeout=20)
        assert (await holder.ask("serving", timeout=10))["version"] == 2


def _staged(version: int, scale: float = 1.0):
    state = synthetic_state(seed=version, tensors=4, numel=100)
    state = [(name, t * scale) for name, t in state]
    plan = BucketPlan.build(version, state, bucket_bytes=256)
    tensors = plan.match(state)
    buffers = [plan.pack(i, tensors, torch.empty(plan.bucket_nbytes(i), dtype=torch.uint8))
               for i in range(len(plan.buckets))]
    return plan, buffers, state


def test_staging_commits_only_complete_versions():
    staging = WeightStaging()
    plan, buffers, state = _staged(1)
    staging.add(1, 0, buffers[0], plan.to_dict())
    staging.add(1, 2, buffers[2])
    with pytest.raises(WeightSyncError, match=r"buckets \[1, 3\] of 4 have not arrived"):
        staging.commit(1)
    staging.add(1, 1, buffers[1])
    staging.add(1, 3, buffers[3])
    assert digests(staging.commit(1)) == digests(state)
    with pytest.raises(ValueError, match="stale: version 1 is committed"):
        staging.add(1, 0, buffers[0], plan)


def test_a_newer_version_discards_a_partial_older_one():
    staging = WeightStaging()
    plan2, buffers2, _ = _staged(2)
    plan3, buffers3, state3 = _staged(3)
    staging.add(2, 0, buffers2[0], plan2)
    staging.add(3, 0, buffers3[0], plan3)
    assert staging.discarded == 1
    with pytest.raises(ValueError, match="stale: version 3 is staging"):
        staging.add(2, 1, buffers2[1])
    with pytest.raises(WeightSyncError, match="staging holds version 3"):
        staging.commit(2)
    for index in range(1, 4):
        staging.add(3, index, buffers3[index])
    assert digests(staging.commit(3)) == digests(state3)


def test_staging_rejects_bad_buckets():
    staging = WeightStaging()
    plan, buffers, _ = _staged(1)
    with pytest.raises(ValueError, match="must carry its plan"):
        staging.add(1, 0, buffers[0])
    with pytest.raises(ValueError, match="index 9 out of range"):
        staging.add(1, 9, buffers[0], plan)
    with pytest.raises(ValueError, match="needs a 1-d uint8 buffer of 200 bytes"):
        staging.add(1, 0, buffers[0][:10], plan)
    with pytest.raises(ValueError, match="its plan says 1"):
        staging.add(5, 0, buffers[0], plan)
    with pytest.raises(ValueError, match="weights version must be an int >= 0"):
        staging.add("1", 0, buffers[0], plan)
    # A bad bucket of a newer version leaves the staged one alone.
    staging.add(1, 0, buffers[0], plan)
    plan2, buffers2, _ = _staged(2)
    with pytest.raises(ValueError, match="needs a 1-d uint8 buffer"):
        staging.add(2, 0, buffers2[0].view(torch.int16), plan2)
    assert (staging.plan, staging.discarded, staging.missing()) == (plan, 0, [1, 2, 3])
