"""Two parts of the torch engine, each against what it replaced, measured in the same run.

SmolLM2-135M-Instruct in fp32, one thread on `--core`, as in the job.

1. The output head. On a CPU the engine computes the logits `HEAD_CHUNK` vocabulary rows
   per matmul (`asystem.torch_engine._chunk_output_head`). One engine decodes `--rows`
   requests of a `--prompt`-token prompt while the head switches between the chunked and
   transformers' plain forward at every decode step, so that a slow spell of this noisy
   machine hits both alike. Figure: the median decode step of each.
2. Prefix reuse. A prefill of one of the main job's prompts (a reasoning-gym problem in the
   job's chat template) whole, against the same prefill taking the keys and values of the
   tokens it shares with another of the job's prompts from the engine's prefix
   (`asystem.torch_engine._Prefix`), alternated `--prefills` times. Figure: the median
   prefill of each.

    .venv/bin/python benchmarks/torch_engine_parts.py              # 16 rows
    .venv/bin/python benchmarks/torch_engine_parts.py --rows 24

The last line is one JSON object with the medians, `chunked_vs_plain` (the chunked head's
decode step / the plain head's) and `reused_vs_whole` (the prefill with the prefix / the
whole prefill): below 1, the engine's way is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402

from asystem.engine import GenerationRequest, SamplingParams  # noqa: E402
from asystem.job import INSTRUCTION  # noqa: E402
from asystem.models import smollm2  # noqa: E402
from asystem.torch_engine import TorchEngine, _Batch  # noqa: E402
from asystem.train_config import TaskConfig  # noqa: E402
from ring.tasks import PromptRenderer, make_task_source  # noqa: E402


async def decode_steps(engine: TorchEngine, args) -> dict[str, list[float]]:
    head = engine._model.get_output_embeddings()
    forwards = {"chunked": head.forward, "plain": type(head).forward.__get__(head)}
    steps: dict[str, list[float]] = {name: [] for name in forwards}
    forward, turn = engine._forward, [0]

    def timed(inputs, *rest):  # runs in the engine's worker thread, one step at a time
        name = ("chunked", "plain")[turn[0] % 2]
        turn[0] += 1
        head.forward = forwards[name]
        started = time.perf_counter()
        out = forward(inputs, *rest)
        if inputs["input_ids"].shape[1] == 1:  # decode steps only
            steps[name].append(time.perf_counter() - started)
        return out

    engine._forward = timed
    prompt = list(range(1000, 1000 + args.prompt))

    async def one(i: int) -> None:
        request = GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=args.tokens, temperature=1.0))
        async for _ in engine.generate(request):
            pass

    try:
        await asyncio.gather(*(one(i) for i in range(args.rows * args.rounds)))
    finally:
        engine._forward = forward
        head.forward = forwards["chunked"]
    return steps


async def prefills(engine: TorchEngine, args) -> tuple[dict[str, list[float]], int, int]:
    """Prefill one job prompt after another, with and without the first one's prefix.
    Returns the times, the tokens shared and the second prompt's length."""
    renderer = PromptRenderer.from_pretrained(str(engine.model_path), instruction=INSTRUCTION)
    first, second = (renderer.tokens(item) for item in make_task_source(TaskConfig().source, split="train")[:2])
    async for _ in engine.generate(GenerationRequest("first", first, SamplingParams(max_tokens=1))):
        pass
    prefix = engine._prefix
    times: dict[str, list[float]] = {"reused": [], "whole": []}
    for i in range(2 * args.prefills):
        name = ("reused", "whole")[i % 2]
        inputs = _Batch().prefill_inputs([second], prefix if name == "reused" else None)
        started = time.perf_counter()
        await asyncio.to_thread(engine._forward, inputs, torch.ones(1), torch.ones(1), [(None, 0)])
        times[name].append(time.perf_counter() - started)
    return times, prefix.shared([tuple(second)]), len(second)


async def measure(args) -> tuple[dict, tuple]:
    engine = TorchEngine(smollm2(torch.float32), dtype="float32", device="cpu", max_batch=args.rows)
    await asyncio.wait_for(engine.start(), 600)
    try:
        return await decode_steps(engine, args), await prefills(engine, args)
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="requests decoded at once")
    parser.add_argument("--prompt", type=int, default=53, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="batches of --rows requests")
    parser.add_argument("--prefills", type=int, default=8, help="prefills of each kind")
    parser.add_argument("--core", type=int, default=0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    steps, (prefill, shared, tokens) = asyncio.run(measure(args))
    median = {name: statistics.median(v) * 1e3 for name, v in [*steps.items(), *prefill.items()]}
    for name, v in steps.items():
        print(f"decode, {name:<8} head  {len(v):>4} steps  median {median[name]:6.1f} ms  "
              f"range {min(v) * 1e3:6.1f}-{max(v) * 1e3:6.1f} ms")
    for name in ("reused", "whole"):
        what = f"{shared} of {tokens} tokens reused" if name == "reused" else f"all {tokens} tokens"
        print(f"prefill, {what:<24} median {median[name]:6.1f} ms")
    print(json.dumps({"rows": args.rows, "chunked_ms": round(median["chunked"], 1),
                      "plain_ms": round(median["plain"], 1),
                      "chunked_vs_plain": round(median["chunked"] / median["plain"], 3),
                      "prompt_tokens": tokens, "shared_tokens": shared,
                      "reused_ms": round(median["reused"], 1), "whole_ms": round(median["whole"], 1),
                      "reused_vs_whole": round(median["reused"] / median["whole"], 3)}))


if __name__ == "__main__":
    main()
