"""The rollout engine contract (asystem/engine.py), checked on every backend.

Each backend is built the way the RolloutWorker builds it (`asystem.rollout.make_engine`)
and shared by the module. The torch engine runs a tiny random Llama; vLLM runs SmolLM2
(its CPU kernels want real head sizes) and is skipped when `asystem.vllm_engine` does not
import. The assertions are about semantics only, never about a particular model's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asystem.engine import EngineError, GenerationRequest, SamplingParams
from asystem.models import smollm2, tiny_llama
from asystem.rollout import WorkerConfig, make_engine

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


def _vllm_missing() -> str | None:
    # Looked up, not imported: importing vLLM costs seconds, and these tests are slow anyway.
    for module in ("vllm", "asystem.vllm_engine"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed here"
    return None


BACKENDS = [
    pytest.param("torch"),
    pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.skipif(
        _vllm_missing() is not None, reason=str(_vllm_missing()))]),
]
# How each backend is built: model, precision, and its own constructor options.
SETUP = {
    "torch": {"model": tiny_llama, "dtype": "float32", "engine_options": {"device": "cpu"}},
    "vllm": {"model": smollm2, "dtype": "bfloat16", "engine_options": {"gpu_memory_utilization": 0.15}},
}
GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPT = [1, 504, 3325, 28, 9, 88]


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=BACKENDS)
async def setup(request):
    backend = request.param
    spec = SETUP[backend]
    path = spec["model"]()
    engine = make_engine(WorkerConfig(model=str(path), backend=backend, dtype=spec["dtype"], max_batch=8,
                                      engine_options=spec["engine_options"]))
    await asyncio.wait_for(engine.start(), 240)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    yield engine, original, AutoTokenizer.from_pretrained(path)
    await asyncio.wait_for(engine.close(), 60)


@pytest.fixture
def engine(setup):
    return setup[0]


async def collect(stream, until: int | None = None):
    """(tokens, logprobs, versions, chunks) of a stream; with `until`, stop reading there."""
    tokens, logprobs, versions, chunks = [], [], [], []
    async with asyncio.timeout(120), contextlib.aclosing(stream):  # closing abandons the request
        async for chunk in stream:
            assert len(chunk.tokens) == len(chunk.logprobs)
            chunks.append(chunk)
            tokens += chunk.tokens
            logprobs += chunk.logprobs
            versions += [chunk.version] * len(chunk.tokens)
            if until is not None and len(tokens) >= until:
                break
    return tokens, logprobs, versions, chunks


def request(rid: str, sampling=GREEDY, prompt=PROMPT, **kw) -> GenerationRequest:
    return GenerationRequest(rid, list(prompt), sampling, **kw)


async def test_a_request_streams_its_tokens_and_ends_with_length(engine):
    tokens, logprobs, versions, chunks = await collect(engine.generate(request("len")))
    assert len(tokens) == GREEDY.max_tokens and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None and not c.interrupted for c in chunks[:-1])
    assert all(math.isfinite(lp) and lp <= 1e-6 for lp in logprobs)
    assert set(versions) == {engine.version}


async def test_greedy_and_seeded_sampling_repeat(engine):
    assert (await collect(engine.generate(request("g1"))))[0] == (await collect(engine.generate(request("g2"))))[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=5)
    a = (await collect(engine.generate(request("s1", seeded))))[0]
    b = (await collect(engine.generate(request("s2", seeded))))[0]
    assert a == b


async def test_interrupt_returns_partials_that_continue(engine):
    sampling = SamplingParams(temperature=0, max_tokens=200)
    stream = engine.generate(request("part", sampling))
    task = asyncio.create_task(collect(stream))
    while engine.stats().tokens_total == 0 or engine.stats().running == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    [partial] = await engine.interrupt(["part", "no-such-request"])
    tokens, logprobs, _, chunks = await task
    assert chunks[-1].interrupted and chunks[-1].finish_reason is None
    assert partial.request_id == "part" and partial.response_tokens == tokens and partial.logprobs == logprobs
    assert len(partial.versions) == len(tokens) and partial.remaining == 200 - len(tokens)
    assert await engine.interrupt(["part"]) == []
    rest = (await collect(engine.generate(partial), until=3))[0]
    assert len(rest) >= 3


async def test_a_continuation_with_nothing_left_ends_at_once(engine):
    tokens, logprobs, *_ = await collect(engine.generate(request("full")))
    done = request("full2", response_tokens=tokens, logprobs=logprobs, versions=[engine.version] * len(tokens))
    rest, _, _, chunks = await collect(engine.generate(done))
    assert rest == [] and chunks[-1].finish_reason == "length"


async def test_stop_strings_end_with_eos(engine, setup):
    tokenizer = setup[2]
    plain = (await collect(engine.generate(request("plain", SamplingParams(temperature=0, max_tokens=16)))))[0]
    text = tokenizer.decode(plain, skip_special_tokens=True)
    stop = text[len(text) // 2:][:2]
    tokens, _, _, chunks = await collect(engine.generate(request("stop", SamplingParams(temperature=0, max_tokens=16, stop=(stop,)))))
    assert chunks[-1].finish_reason == "eos" and stop in tokenizer.decode(tokens, skip_special_tokens=True)
    assert tokens == plain[:len(tokens)] and len(tokens) < 16


async def test_a_request_the_engine_cannot_serve_raises_engine_error(engine):
    with pytest.raises(EngineError):
        await collect(engine.generate(request("oov", prompt=[1, 10**7])))
    assert len((await collect(engine.generate(request("after"))))[0]) == GREEDY.max_tokens


async def test_pause_holds_and_resume_continues(engine):
    task = asyncio.create_task(collect(engine.generate(request("pz", SamplingParams(temperature=0, max_tokens=24)))))
    while engine.stats().running == 0:
        await asyncio.sleep(0.005)
    await engine.pause()
    await engine.pause()  # idempotent
    held = engine.stats().tokens_total
    await asyncio.sleep(0.3)
    assert engine.stats().tokens_total == held and not task.done()
    await engine.resume()
    await engine.resume()
    tokens, _, _, chunks = await task
    assert len(tokens) == 24 and chunks[-1].finish_reason == "length"


async def test_update_weights_sets_the_version_of_later_tokens_all_or_nothing(engine, setup):
    original = setup[1]
    v0 = engine.version
    before = (await collect(engine.generate(request("w0"))))[0]
    name, tensor = next((n, t) for n, t in original.items() if t.dim() == 2)
    with pytest.raises(EngineError):
        await engine.update_weights(v0 + 1, [(name, tensor), ("model.no.such.weight", tensor)])
    with pytest.raises(EngineError):
        await engine.update_weights(v0 + 1, [(name, tensor[:1])])
    assert engine.version == v0 and (await collect(engine.generate(request("w1"))))[0] == before
    # Keep mode: a request running across the update continues under the new version.
    gen = torch.Generator().manual_seed(0)
    new = [(n, t + 0.02 * torch.randn(t.shape, generator=gen)) for n, t in original.items()]
    versions = []
    stream = engine.generate(request("w2", SamplingParams(temperature=0, max_tokens=1000)))
    async with asyncio.timeout(120), contextlib.aclosing(stream):
        async for chunk in stream:
            versions += [chunk.version] * len(chunk.tokens)
            if versions and engine.version == v0:
                await engine.update_weights(v0 + 1, new)
            if versions[-1:] == [v0 + 1]:
                break
    assert engine.version == v0 + 1 and versions[0] == v0 and versions == sorted(versions)
    with pytest.raises(EngineError):
        await engine.update_weights(v0, [(name, tensor)])
    await engine.update_weights(v0 + 2, original.items())
    assert (await collect(engine.generate(request("w3"))))[0] == before


async def test_stats_and_health(engine):
    await engine.health()
    before = engine.stats().tokens_total
    await collect(engine.generate(request("st")))
    async with asyncio.timeout(30):  # closed streams leave at the next step boundary
        while engine.stats().running or engine.stats().queued:
            await asyncio.sleep(0.01)
    stats = engine.stats()
    assert stats.version == engine.version and stats.tokens_total - before == GREEDY.max_tokens
    assert stats.tokens_per_s > 0
