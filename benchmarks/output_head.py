"""The torch engine's decode step with its chunked output head against transformers' plain one.

On a CPU the engine computes the logits `HEAD_CHUNK` vocabulary rows per matmul
(`asystem.torch_engine._chunk_output_head`). Here one engine (SmolLM2-135M-Instruct, fp32,
one thread on `--core`, as in the job) decodes `--rows` requests of a `--prompt`-token
prompt, and the head switches between the chunked and the plain forward at every decode
step, so that a slow spell of this noisy machine hits both alike. The figure is the median
decode step of each.

    .venv/bin/python benchmarks/output_head.py              # 16 rows, 3 rounds
    .venv/bin/python benchmarks/output_head.py --rows 24

The last line is one JSON object with both medians and `chunked_vs_plain` (the chunked
head's median step / the plain head's: below 1, chunked is faster).
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
from asystem.models import smollm2  # noqa: E402
from asystem.torch_engine import TorchEngine  # noqa: E402


async def measure(args) -> dict[str, list[float]]:
    engine = TorchEngine(smollm2(torch.float32), dtype="float32", device="cpu", max_batch=args.rows)
    await asyncio.wait_for(engine.start(), 600)
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
        await engine.close()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="requests decoded at once")
    parser.add_argument("--prompt", type=int, default=53, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="batches of --rows requests")
    parser.add_argument("--core", type=int, default=0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    steps = asyncio.run(measure(args))
    median = {name: statistics.median(v) * 1e3 for name, v in steps.items()}
    for name, v in steps.items():
        print(f"{name:<8} {len(v):>4} decode steps  median {median[name]:6.1f} ms  "
              f"range {min(v) * 1e3:6.1f}-{max(v) * 1e3:6.1f} ms")
    print(json.dumps({"rows": args.rows, "chunked_ms": round(median["chunked"], 1),
                      "plain_ms": round(median["plain"], 1),
                      "chunked_vs_plain": round(median["chunked"] / median["plain"], 3)}))


if __name__ == "__main__":
    main()
