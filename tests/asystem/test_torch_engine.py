"""TorchEngine against transformers on the same weights: greedy tokens and per-token
log-probabilities, batch independence, interrupt and continue, weight updates and the
versions tokens carry, seeded sampling, stop strings, max_tokens, bad input, failures."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asystem.engine import EngineError, GenerationRequest, SamplingParams
from asystem.models import smollm2, tiny_llama
from asystem.torch_engine import _SLACK_COLUMNS, HEAD_CHUNK, TorchEngine, _append, _chunk_output_head

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

GREEDY = SamplingParams(temperature=0, max_tokens=16)
PROMPTS = [[1, 504, 3325, 28], [1, 9, 88, 7000, 30001, 45, 12, 640, 2211, 17, 5], [300, 301]]


@pytest.fixture(scope="module")
def model_dir():
    return tiny_llama()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(model_dir):
    """One engine for the tests that leave its weights alone."""
    eng = TorchEngine(model_dir, dtype=torch.float32, max_batch=4)  # on ASYSTEM_DEVICE
    await asyncio.wait_for(eng.start(), 60)
    yield eng
    await eng.close()


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_engine(model_dir):
    """An engine of its own, for tests that change weights or break things."""
    eng = TorchEngine(model_dir, dtype=torch.float32, max_batch=4)  # on ASYSTEM_DEVICE
    await asyncio.wait_for(eng.start(), 60)
    yield eng
    await eng.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


class Result:
    def __init__(self):
        self.tokens, self.logprobs, self.versions, self.chunks = [], [], [], []
        self.finish_reason = None
        self.interrupted = False


async def run(engine, request: GenerationRequest, until: int | None = None, out: Result | None = None) -> Result:
    """Collect a request's stream; with `until`, return once that many tokens arrived."""
    out = out or Result()
    stream = engine.generate(request)
    async with asyncio.timeout(60):
        async for chunk in stream:
            out.chunks.append(chunk)
            out.tokens += chunk.tokens
            out.logprobs += chunk.logprobs
            out.versions += [chunk.version] * len(chunk.tokens)
            out.finish_reason, out.interrupted = chunk.finish_reason, chunk.interrupted
            if until is not None and len(out.tokens) >= until:
                return out
    return out


def teacher_forced(model, prompt: list[int], response: list[int], temperature: float = 1.0):
    """log p(response token | prefix) and the arg-max at each response position, by one
    full forward pass without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
    scaled = logits / temperature if temperature > 0 else logits
    logp = torch.log_softmax(scaled, -1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), logits.argmax(-1)


def request(rid, prompt, sampling=GREEDY, **kw) -> GenerationRequest:
    return GenerationRequest(str(rid), list(prompt), sampling, **kw)


def perturbed(model_dir, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """The weights a trainer step might send: every tensor moved a little."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return {name: t + scale * torch.randn(t.shape, generator=gen) for name, t in model.state_dict().items()}


# -- what the engine samples --------------------------------------------------------------


async def test_greedy_tokens_and_logprobs_match_transformers(engine, reference):
    results = await asyncio.gather(*(run(engine, request(f"g{i}", p)) for i, p in enumerate(PROMPTS)))
    for prompt, res in zip(PROMPTS, results):
        assert res.finish_reason == "length" and len(res.tokens) == GREEDY.max_tokens
        logp, argmax = teacher_forced(reference, prompt, res.tokens)
        assert res.tokens == argmax.tolist(), "greedy must pick transformers' arg-max at every step"
        assert torch.allclose(torch.tensor(res.logprobs), logp, atol=1e-4), (res.logprobs, logp)
        assert set(res.versions) == {0}


async def test_a_request_decodes_the_same_alone_and_batched(engine):
    alone = await run(engine, request("alone", PROMPTS[1]))
    # Others join before it and while it runs (more than max_batch: some wait), and leave
    # before it ends: its rows are padded, merged, cut and trimmed around it.
    others = [asyncio.create_task(run(engine, request(f"o{i}", PROMPTS[i % 3] + [i], SamplingParams(
        temperature=0.8, max_tokens=3 + 4 * i, seed=i)))) for i in range(6)]
    mine = asyncio.create_task(run(engine, request("batched", PROMPTS[1])))
    late = [asyncio.create_task(run(engine, request(f"late{i}", [7] * (20 + i)))) for i in range(2)]
    batched, *_ = await asyncio.gather(mine, *others, *late)
    assert batched.tokens == alone.tokens
    assert max(abs(a - b) for a, b in zip(batched.logprobs, alone.logprobs)) < 1e-5


async def test_a_group_sharing_a_prompt_is_prefilled_once_and_samples_as_if_alone(engine):
    group = [SamplingParams(temperature=1.0, max_tokens=10, seed=s) for s in (11, 12, 13, 14)]
    alone = [await run(engine, request(f"a{i}", PROMPTS[2], sampling)) for i, sampling in enumerate(group)]
    shared = engine.counters["prefill_rows_shared"]
    together = await asyncio.gather(*(run(engine, request(f"t{i}", PROMPTS[2], sampling))
                                      for i, sampling in enumerate(group)))
    assert engine.counters["prefill_rows_shared"] == shared + 3, "one prefill row for the four requests"
    assert len({tuple(r.tokens) for r in together}) > 1, "each request samples its own tokens"
    for a, t in zip(alone, together):
        assert t.tokens == a.tokens
        assert max(abs(x - y) for x, y in zip(t.logprobs, a.logprobs)) < 1e-5


async def test_a_prefill_takes_the_leading_columns_it_shares_with_the_last_context(fresh_engine, reference, model_dir):
    first = PROMPTS[1]  # 11 tokens
    # They share 8 tokens with `first` and join in one prefill: each row is then [the 8
    # shared columns][left padding][its own tokens].
    second, third = first[:8] + [77, 78, 79], first[:8] + [5]
    await run(fresh_engine, request("p1", first))
    reused = fresh_engine.counters["prefill_tokens_reused"]
    results = await asyncio.gather(run(fresh_engine, request("p2", second)), run(fresh_engine, request("p3", third)))
    assert fresh_engine.counters["prefill_tokens_reused"] == reused + 2 * 8
    for prompt, res in zip((second, third), results):
        logp, argmax = teacher_forced(reference, prompt, res.tokens)
        assert res.tokens == argmax.tolist()
        assert torch.allclose(torch.tensor(res.logprobs), logp, atol=1e-4), (res.logprobs, logp)
    # The last context prefilled was `second`: `second` again shares all but its last token.
    again = await run(fresh_engine, request("p4", second))
    assert fresh_engine.counters["prefill_tokens_reused"] == reused + 2 * 8 + 10
    assert again.tokens == results[0].tokens
    assert max(abs(a - b) for a, b in zip(again.logprobs, results[0].logprobs)) < 1e-5
    # New weights under the same version number: nothing computed before is taken.
    new = perturbed(model_dir)
    await fresh_engine.update_weights(fresh_engine.version, new.items())
    reused = fresh_engine.counters["prefill_tokens_reused"]
    after = await run(fresh_engine, request("p5", second))
    assert fresh_engine.counters["prefill_tokens_reused"] == reused
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trained.load_state_dict(new)
    logp, argmax = teacher_forced(trained, second, after.tokens)
    assert after.tokens == argmax.tolist() and torch.allclose(torch.tensor(after.logprobs), logp, atol=1e-4)


async def test_cache_columns_are_appended_in_place_without_changing_earlier_views():
    first = torch.randn(2, 3, 5, 4)
    cache = _append(None, first)
    assert torch.equal(cache, first) and cache.data_ptr() != first.data_ptr()
    views, news = [cache], []
    for _ in range(_SLACK_COLUMNS + 3):  # past the buffer's spare columns: it grows once
        news.append(torch.randn(2, 3, 1, 4))
        views.append(_append(views[-1], news[-1]))
    assert torch.equal(views[-1], torch.cat([first, *news], dim=2))
    assert views[1].data_ptr() == views[0].data_ptr(), "written into the spare columns"
    assert views[-1].data_ptr() != views[0].data_ptr(), "a new buffer once they ran out"
    for i, view in enumerate(views):  # each earlier view still holds what it held
        assert torch.equal(view, torch.cat([first, *news[:i]], dim=2))


@pytest.mark.parametrize("bias", [False, True])
async def test_the_chunked_output_head_computes_the_plain_heads_logits_and_follows_its_weight(bias):
    class Model(torch.nn.Module):  # the one method _chunk_output_head uses
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 2 * HEAD_CHUNK + 5, bias=bias)  # a partial last slice

        def get_output_embeddings(self):
            return self.head

    model, hidden = Model(), torch.randn(3, 1, 8)
    plain = model.head(hidden)
    _chunk_output_head(model)
    torch.testing.assert_close(model.head(hidden), plain, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # a weight update copies into the weight: the slices see it
        model.head.weight.mul_(2)
        if bias:
            model.head.bias.mul_(2)
    torch.testing.assert_close(model.head(hidden), 2 * plain, rtol=1e-6, atol=1e-6)


async def test_interrupt_then_continue_equals_the_uninterrupted_run(engine):
    for sampling in (SamplingParams(temperature=0, max_tokens=20),
                     SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=7)):
        whole = await run(engine, request("whole", PROMPTS[0], sampling))
        first = Result()
        task = asyncio.create_task(run(engine, request("split", PROMPTS[0], sampling), out=first))
        while len(first.tokens) < 6:
            await asyncio.sleep(0.001)
        [partial] = await engine.interrupt(["split"])
        await task
        assert first.interrupted and first.finish_reason is None
        assert partial.response_tokens == first.tokens and partial.logprobs == first.logprobs
        assert 6 <= len(partial.response_tokens) < 20 and partial.remaining == 20 - len(first.tokens)
        rest = await run(engine, partial)
        assert rest.finish_reason == "length"
        assert first.tokens + rest.tokens == whole.tokens
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(first.logprobs + rest.logprobs, whole.logprobs))


async def test_interrupt_all_returns_waiting_and_running_requests(engine):
    tasks = [asyncio.create_task(run(engine, request(f"i{i}", [40 + i] * 3, SamplingParams(temperature=0, max_tokens=400))))
             for i in range(6)]  # max_batch 4: two wait
    while engine.stats().running < 4:
        await asyncio.sleep(0.001)
    partials = await engine.interrupt()
    results = await asyncio.gather(*tasks)
    assert sorted(p.request_id for p in partials) == [f"i{i}" for i in range(6)]
    assert all(r.interrupted and r.finish_reason is None for r in results)
    for p, r in zip(sorted(partials, key=lambda p: p.request_id), results):
        assert p.response_tokens == r.tokens
    assert await engine.interrupt(["i0", "unknown"]) == []  # gone already
    assert engine.stats().running == engine.stats().queued == 0


async def test_seeded_sampling_is_reproducible_and_logprobs_are_the_sampling_distribution(engine, reference):
    prompt = PROMPTS[1]
    for top_p in (1.0, 0.5):
        sampling = SamplingParams(temperature=0.7, top_p=top_p, max_tokens=12, seed=1234)
        a = await run(engine, request("s1", prompt, sampling))
        # The same seed again, now batched with unseeded requests: the same tokens.
        b, *_ = await asyncio.gather(run(engine, request("s2", prompt, sampling)),
                                     *(run(engine, request(f"x{i}", prompt, SamplingParams(max_tokens=5))) for i in range(3)))
        other = await run(engine, request("s3", prompt, SamplingParams(temperature=0.7, top_p=top_p, max_tokens=12, seed=99)))
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
        assert other.tokens != a.tokens
        tempered, _ = teacher_forced(reference, prompt, a.tokens, temperature=0.7)
        if top_p == 1.0:  # the log-probability under softmax(logits / T)
            assert torch.allclose(torch.tensor(a.logprobs), tempered, atol=1e-4)
        else:  # renormalised over the nucleus: at least the full distribution's, and <= 0
            assert all(lp >= t - 1e-5 and lp <= 1e-6 for lp, t in zip(a.logprobs, tempered.tolist()))
            assert any(lp > t + 1e-3 for lp, t in zip(a.logprobs, tempered.tolist()))


async def test_unseeded_sampling_differs_between_requests(engine):
    sampling = SamplingParams(temperature=1.0, max_tokens=12)
    a, b = await asyncio.gather(*(run(engine, request(f"u{i}", PROMPTS[0], sampling)) for i in range(2)))
    assert a.tokens != b.tokens


async def test_stop_strings_end_the_response_where_the_text_first_contains_them(engine, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    greedy = await run(engine, request("plain", PROMPTS[2], SamplingParams(temperature=0, max_tokens=24)))
    text = tokenizer.decode(greedy.tokens[:10], skip_special_tokens=True)
    stop = text[len(tokenizer.decode(greedy.tokens[:8], skip_special_tokens=True)) - 1:][:3]
    expected = next(k for k in range(1, 25) if stop in tokenizer.decode(greedy.tokens[:k], skip_special_tokens=True))
    res = await run(engine, request("stop", PROMPTS[2], SamplingParams(temperature=0, max_tokens=24, stop=("never!", stop))))
    assert res.finish_reason == "eos"
    assert res.tokens == greedy.tokens[:expected]


async def test_max_tokens_bounds_the_whole_response_continuations_included(engine):
    res = await run(engine, request("m", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5)))
    assert len(res.tokens) == 5 and res.finish_reason == "length"
    partial = request("m2", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5),
                      response_tokens=res.tokens[:3], logprobs=res.logprobs[:3], versions=[0, 0, 0])
    rest = await run(engine, partial)
    assert rest.tokens == res.tokens[3:] and rest.finish_reason == "length"
    done = request("m3", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5),
                   response_tokens=res.tokens, logprobs=res.logprobs, versions=[0] * 5)
    nothing = await run(engine, done)
    assert nothing.tokens == [] and nothing.finish_reason == "length"


async def test_requests_the_engine_cannot_serve_raise_and_the_others_go_on(engine, reference):
    vocab = reference.config.vocab_size
    bad = [request("oov", [1, vocab]), request("empty", []),
           request("long", [1] * 2040, SamplingParams(max_tokens=16)),
           request("mismatch", [1, 2], response_tokens=[3], logprobs=[], versions=[])]
    for req in bad:
        with pytest.raises(EngineError, match=req.request_id):
            await run(engine, req)
    running = asyncio.create_task(run(engine, request("dup", PROMPTS[0], SamplingParams(temperature=0, max_tokens=200))))
    while not running.done() and engine.stats().running == 0:
        await asyncio.sleep(0.001)
    with pytest.raises(EngineError, match="already running"):
        await run(engine, request("dup", PROMPTS[0]))
    await engine.interrupt(["dup"])
    assert (await running).interrupted
    assert len((await run(engine, request("ok", PROMPTS[0]))).tokens) == GREEDY.max_tokens


async def test_a_consumer_that_stops_reading_frees_its_row(engine):
    stream = engine.generate(request("quitter", PROMPTS[0], SamplingParams(temperature=0, max_tokens=500)))
    async for _ in stream:
        break
    await stream.aclose()
    async with asyncio.timeout(10):
        while engine.stats().running or engine.stats().queued:
            await asyncio.sleep(0.005)
    assert engine.counters["abandoned"] >= 1


async def test_pause_holds_requests_and_resume_continues_them(engine):
    task = asyncio.create_task(run(engine, request("p", PROMPTS[0], SamplingParams(temperature=0, max_tokens=40))))
    while engine.stats().tokens_total == 0 or engine.stats().running == 0:
        await asyncio.sleep(0.001)
    await engine.pause()
    before = engine.stats().tokens_total
    queued = asyncio.create_task(run(engine, request("q", PROMPTS[1], SamplingParams(temperature=0, max_tokens=4))))
    await asyncio.sleep(0.3)  # whatever the time, a paused engine samples nothing
    assert engine.stats().tokens_total == before and engine.stats().queued == 1 and not task.done()
    await engine.resume()
    assert len((await task).tokens) == 40 and len((await queued).tokens) == 4


async def test_stats_and_health(engine):
    await engine.health()
    before = engine.stats()
    res = await run(engine, request("st", PROMPTS[0], SamplingParams(temperature=0, max_tokens=7)))
    after = engine.stats()
    assert after.tokens_total - before.tokens_total == len(res.tokens) == 7
    assert after.tokens_per_s > 0 and after.version == 0 and after.running == after.queued == 0


# -- weights ---------------------------------------------------------------------------


async def test_after_update_weights_the_output_follows_the_new_weights(fresh_engine, reference, model_dir):
    new = perturbed(model_dir)
    before = await run(fresh_engine, request("b", PROMPTS[1]))
    await fresh_engine.update_weights(1, new.items())
    reused = fresh_engine.counters["prefill_tokens_reused"]
    after = await run(fresh_engine, request("a", PROMPTS[1]))
    assert fresh_engine.version == 1 and set(after.versions) == {1}
    assert fresh_engine.counters["prefill_tokens_reused"] == reused, "nothing from the old weights"
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trained.load_state_dict(new)
    logp, argmax = teacher_forced(trained, PROMPTS[1], after.tokens)
    assert after.tokens == argmax.tolist() and torch.allclose(torch.tensor(after.logprobs), logp, atol=1e-4)
    assert after.tokens != before.tokens


async def test_running_requests_keep_going_under_new_weights_with_the_new_version(fresh_engine, model_dir):
    new = perturbed(model_dir)
    res = Result()
    task = asyncio.create_task(run(fresh_engine, request("k", PROMPTS[0], SamplingParams(temperature=0, max_tokens=30)), out=res))
    while len(res.tokens) < 5:
        await asyncio.sleep(0.001)
    await fresh_engine.update_weights(3, new.items())
    await task
    assert res.finish_reason == "length" and len(res.tokens) == 30
    switch = res.versions.index(3)
    assert 5 <= switch < 30 and res.versions == [0] * switch + [3] * (30 - switch)


async def test_resubmitted_continuation_is_decoded_under_the_new_weights(fresh_engine, model_dir):
    """Interrupt, update, continue: the continuation is re-prefilled, so it is exactly what
    the new weights say after the old prefix."""
    new = perturbed(model_dir, seed=5)
    res = Result()
    task = asyncio.create_task(run(fresh_engine, request("r", PROMPTS[1], SamplingParams(temperature=0, max_tokens=20)), out=res))
    while len(res.tokens) < 5:
        await asyncio.sleep(0.001)
    [partial] = await fresh_engine.interrupt()
    await task
    await fresh_engine.update_weights(1, new.items())
    rest = await run(fresh_engine, partial)
    assert set(rest.versions) == {1} and len(partial.response_tokens) + len(rest.tokens) == 20
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trained.load_state_dict(new)
    logp, argmax = teacher_forced(trained, PROMPTS[1] + partial.response_tokens, rest.tokens)
    assert rest.tokens == argmax.tolist() and torch.allclose(torch.tensor(rest.logprobs), logp, atol=1e-4)


async def test_update_weights_is_all_or_nothing(fresh_engine, model_dir):
    before = await run(fresh_engine, request("before", PROMPTS[0]))
    good = perturbed(model_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    cases = {
        "shape": [*good.items(), ("model.norm.weight", torch.zeros(3))],
        "not a tensor": [*good.items(), ("model.norm.weight", [1.0])],
        "unknown": [*good.items(), ("model.layers.99.mlp.up_proj.weight", good[name])],
        "twice": [*good.items(), (name, good[name])],
    }
    for what, items in cases.items():
        with pytest.raises(EngineError):
            await fresh_engine.update_weights(1, items)
        assert fresh_engine.version == 0, what
        assert (await run(fresh_engine, request(f"after {what}", PROMPTS[0]))).tokens == before.tokens, what
    await fresh_engine.update_weights(2, [(name, good[name])])  # a subset is fine
    with pytest.raises(EngineError, match="older"):
        await fresh_engine.update_weights(1, [(name, good[name])])
    assert fresh_engine.version == 2


async def test_non_finite_logits_fail_the_requests_and_the_engine_recovers(fresh_engine, model_dir):
    original = perturbed(model_dir, scale=0.0)
    tasks = [asyncio.create_task(run(fresh_engine, request(f"n{i}", PROMPTS[i], SamplingParams(temperature=0, max_tokens=300))))
             for i in range(2)]
    while fresh_engine.stats().running < 2:
        await asyncio.sleep(0.001)
    broken = {"model.norm.weight": torch.full_like(original["model.norm.weight"], float("nan"))}
    await fresh_engine.update_weights(1, broken.items())
    for task in tasks:
        with pytest.raises(EngineError, match="non-finite"):
            await task
    assert fresh_engine.counters["failed_requests"] == 2
    await fresh_engine.health()  # a bad request is not a broken engine
    await fresh_engine.update_weights(2, original.items())
    assert len((await run(fresh_engine, request("ok", PROMPTS[0]))).tokens) == GREEDY.max_tokens


async def test_close_ends_open_streams_and_health_says_so(model_dir):
    eng = TorchEngine(model_dir, dtype="float32", device="cpu", max_batch=1)
    await asyncio.wait_for(eng.start(), 60)
    tasks = [asyncio.create_task(run(eng, request(f"c{i}", PROMPTS[0], SamplingParams(max_tokens=1000)))) for i in range(2)]
    while eng.stats().tokens_total == 0:
        await asyncio.sleep(0.001)
    await eng.close()
    for task in tasks:
        with pytest.raises(EngineError, match="closed"):
            await task
    with pytest.raises(EngineError):
        await eng.health()
    with pytest.raises(EngineError):
        await run(eng, request("late", PROMPTS[0]))


async def test_weights_received_from_the_broadcast_group(fresh_engine, model_dir, reference):
    weights = pytest.importorskip("asystem.weights")
    on_cuda = fresh_engine.device.type == "cuda"
    if on_cuda and torch.cuda.device_count() < 2:
        pytest.skip("on CUDA this needs 2 GPUs: NCCL puts the trainer's rank and the engine's on one each")
    new = perturbed(model_dir, seed=3)
    spec = weights.WeightSyncSpec("127.0.0.1", weights.free_port(), world_size=2, timeout_s=30,
                                  backend="nccl" if on_cuda else "gloo")
    plan = weights.BucketPlan.build(4, new.items(), bucket_bytes=1 << 20)
    sent = {}
    trainer_device = torch.device("cuda", (fresh_engine.device.index or 0) + 1) if on_cuda else None
    new_there = {k: v.to(trainer_device) for k, v in new.items()} if on_cuda else new

    def trainer():  # rank 0, as the trainer process would run it
        with weights.WeightGroup.join(spec, 0, trainer_device) as group:
            sent["stats"] = weights.WeightSender(group).send(plan, new_there.items(), timeout=30)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        await asyncio.wait_for(fresh_engine.join_weight_group(spec.to_dict(), 1), 30)
        await asyncio.wait_for(fresh_engine.receive_weights(plan.to_dict(), 30), 40)
    finally:
        thread.join(40)
    assert sent["stats"].version == 4 and fresh_engine.version == 4
    after = await run(fresh_engine, request("w", PROMPTS[1]))
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trained.load_state_dict(new)
    _, argmax = teacher_forced(trained, PROMPTS[1], after.tokens)
    assert after.tokens == argmax.tolist() and set(after.versions) == {4}


# -- the real model ------------------------------------------------------------------------


@pytest.mark.slow  # SmolLM2 in bf16: loading and 2 x 48 tokens, about 30-60 s on 2 cores
async def test_smollm2_bf16_answers_a_chat_prompt_like_transformers():
    path = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    eng = TorchEngine(path, dtype=torch.bfloat16, max_batch=4)  # on ASYSTEM_DEVICE
    await asyncio.wait_for(eng.start(), 120)
    try:
        sampling = SamplingParams(temperature=0, max_tokens=48)
        res, _ = await asyncio.gather(run(eng, request("chat", prompt, sampling)),
                                      run(eng, request("other", prompt[:-3] + [28, 9], sampling)))
    finally:
        await eng.close()
    assert res.finish_reason == "eos" and res.tokens[-1] == tokenizer.eos_token_id
    assert "5" in tokenizer.decode(res.tokens, skip_special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + res.tokens])).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits, -1)
    chosen = logp.gather(-1, torch.tensor(res.tokens)[:, None]).squeeze(-1)
    # bf16: batched decoding with a cache and one full forward differ by rounding, so the
    # engine's token is transformers' arg-max or within rounding of it.
    assert (chosen - torch.tensor(res.logprobs)).abs().max() < 0.15
    assert (logp.max(-1).values - chosen).max() < 0.15
