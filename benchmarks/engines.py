"""The rollout engines on the main job's work: seconds per sample, torch engine against vLLM.

Both engines, one after the other in this process, get the same requests: the main job's
prompts (reasoning-gym basic_arithmetic rendered by the job's chat template), G samples of
each at temperature 1, `--tokens` new tokens at most, all submitted at once and awaited.
Each engine runs `--rounds` rounds of new prompts after a warm-up round; the figure is
wall seconds per sample (prefill, decode, sampling, streaming: everything the job waits
for). The engines run on one core (`--core`), as in the job, where the other core trains.

    .venv/bin/python benchmarks/engines.py                    # 8 prompts x G=4, 32 tokens
    .venv/bin/python benchmarks/engines.py --prompts 16 --tokens 64

The last line is one JSON object with each engine's seconds per sample and
`torch_vs_vllm` (vLLM's seconds per sample / the torch engine's: above 1, torch is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from asystem.engine import GenerationRequest, SamplingParams
from asystem.job import INSTRUCTION
from asystem.models import smollm2
from asystem.rollout import WorkerConfig, make_engine
from asystem.train_config import TaskConfig
from ring.tasks import PromptRenderer, make_task_source


async def measure(backend: str, args) -> dict:
    path = smollm2()
    engine = make_engine(WorkerConfig(model=str(path), backend=backend, dtype="float32",
                                      max_batch=args.prompts * args.group))
    await asyncio.wait_for(engine.start(), 600)
    source = make_task_source(TaskConfig().source, split="train")
    renderer = PromptRenderer.from_pretrained(str(path), instruction=INSTRUCTION)
    per_sample, tokens_per_s = [], []
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms up
            requests = [GenerationRequest(f"{rnd}-{p}-{g}", renderer.tokens(source[rnd * args.prompts + p]),
                                          SamplingParams(temperature=1.0, max_tokens=args.tokens))
                        for p in range(args.prompts) for g in range(args.group)]
            tokens = 0

            async def one(request):
                nonlocal tokens
                async for chunk in engine.generate(request):
                    tokens += len(chunk.tokens)

            start = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), 600)
            seconds = time.perf_counter() - start
            print(f"  {backend} round {rnd}{' (warm-up)' if rnd == 0 else ''}: {len(requests)} samples, "
                  f"{tokens} tokens in {seconds:.1f}s: {seconds / len(requests):.3f} s/sample, "
                  f"{tokens / seconds:.0f} tokens/s", flush=True)
            if rnd:
                per_sample.append(seconds / len(requests))
                tokens_per_s.append(tokens / seconds)
    finally:
        await engine.close()
    return {"s_per_sample": statistics.median(per_sample), "tokens_per_s": statistics.median(tokens_per_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="most new tokens per sample")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine")
    parser.add_argument("--core", type=int, default=min(1, os.cpu_count() - 1))
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(args.core))
    import torch

    torch.set_num_threads(1)
    backends = ["torch"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    results = {}
    for backend in backends:
        print(f"{backend}: {args.prompts} prompts x G={args.group}, {args.tokens} tokens, core {args.core}", flush=True)
        results[backend] = asyncio.run(measure(backend, args))
    report = {f"{b}_{k}": round(v, 4) for b, r in results.items() for k, v in r.items()}
    if "vllm" in results:
        report["torch_vs_vllm"] = round(results["vllm"]["s_per_sample"] / results["torch"]["s_per_sample"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
