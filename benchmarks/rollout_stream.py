"""How rollout progress should travel: one coalesced stream per worker, or one per request.

A RolloutWorker (asystem/rollout.py) in its own process decodes N requests at once; every
decode step yields one token per request. The controller can follow them through

- `progress`: one long-lived stream per worker; each item is the list of everything
  produced since the last item (one item per decode step or fewer), or
- `generate`: one stream per request; each item is that request's new tokens.

Both are measured in the same run, on the same worker and workload (greedy, so every run
decodes the same tokens), interleaved and in rotating order, against the ceiling of the
same engine driven in this process without actors. Reported: the wall time until every
request has finished, tokens/s delivered to the consumer, stream items received, the CPU
time this process (the consumer, as the controller would be) spent per 1,000 tokens, and
the ratios. The CPU time is the steadier figure on a loaded machine, and the one that
bounds how many workers one controller can follow. `progress` is what the worker's
docstring recommends; this script is why.

    .venv/bin/python benchmarks/rollout_stream.py [--requests 64] [--tokens 64] [--reps 3] [--model small-vocab|tiny|smollm2]

The default model is a tiny random Llama with a 512-token vocabulary, so that a decode step
costs little and the transport is what differs (with a 49k vocabulary, sampling alone takes
tens of ms per step on a CPU, as with `--model tiny`, and hides it); a GPU engine's steps
are short too, which is where the choice matters.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from actors import ActorSystem
from asystem.engine import GenerationRequest, SamplingParams
from asystem.models import smollm2, tiny_llama
from asystem.rollout import RolloutWorker, WorkerConfig
from asystem.torch_engine import TorchEngine


def small_vocab_llama(vocab: int = 512) -> Path:
    """A tiny random Llama with a small vocabulary (its tokenizer is SmolLM2's; the ids it
    samples stay below `vocab`)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from asystem.models import cache_dir

    target = cache_dir() / f"bench-llama-v{vocab}"
    if not (target / "config.json").exists():
        import torch

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             eos_token_id=None)
        LlamaForCausalLM(config).save_pretrained(target)
        AutoTokenizer.from_pretrained(tiny_llama()).save_pretrained(target)
    return target


def requests(tag: str, n: int, tokens: int) -> list[dict]:
    sampling = SamplingParams(temperature=0, max_tokens=tokens).to_dict()
    return [{"request_id": f"{tag}-{i}", "prompt_tokens": [1, 100 + i, 200 + i, 300 + i % 200], "sampling": sampling}
            for i in range(n)]


async def via_progress(worker, reqs: list[dict]) -> tuple[int, int]:
    """Submit all, follow the worker's one stream until every request finished."""
    left = {r["request_id"] for r in reqs}
    items = tokens = 0
    async with contextlib.aclosing(worker.stream("progress", window=64, timeout=60)) as stream:
        await worker.ask("submit", reqs, timeout=30)
        async for chunks in stream:
            items += 1
            for chunk in chunks:
                tokens += len(chunk["tokens"])
                if chunk["finish_reason"]:
                    left.discard(chunk["request_id"])
            if not left:
                break
    return items, tokens


async def via_request_streams(worker, reqs: list[dict]) -> tuple[int, int]:
    """One `generate` stream per request, all at once."""
    async def follow(req: dict) -> tuple[int, int]:
        items = tokens = 0
        async with contextlib.aclosing(worker.stream("generate", req, window=64, timeout=60)) as stream:
            async for chunks in stream:
                items += 1
                tokens += sum(len(c["tokens"]) for c in chunks)
        return items, tokens

    counts = await asyncio.gather(*(follow(r) for r in reqs))
    return sum(i for i, _ in counts), sum(t for _, t in counts)


async def in_process(engine: TorchEngine, reqs: list[dict]) -> tuple[int, int]:
    """The ceiling: the same engine, no actors, no process boundary."""
    async def follow(req: dict) -> tuple[int, int]:
        items = tokens = 0
        async for chunk in engine.generate(GenerationRequest.from_dict(req)):
            items += 1
            tokens += len(chunk.tokens)
        return items, tokens

    counts = await asyncio.gather(*(follow(r) for r in reqs))
    return sum(i for i, _ in counts), sum(t for _, t in counts)


async def main(args) -> dict:
    path = str({"small-vocab": small_vocab_llama, "tiny": tiny_llama, "smollm2": smollm2}[args.model]())
    dtype = "bfloat16" if args.model == "smollm2" else "float32"
    config = WorkerConfig(model=path, dtype=dtype, max_batch=args.requests, backend="torch",
                          engine_options={"device": "cpu"}).to_dict()
    engine = TorchEngine(path, dtype=dtype, device="cpu", max_batch=args.requests)
    results: dict[str, list[tuple[float, int, int, float]]] = {"progress": [], "per_request": [], "in_process": []}
    async with ActorSystem(default_timeout=60) as system:
        worker = await system.spawn(RolloutWorker, config, where="process", timeout=180)
        await engine.start()
        contenders = {"progress": lambda r: via_progress(worker, r),
                      "per_request": lambda r: via_request_streams(worker, r),
                      "in_process": lambda r: in_process(engine, r)}
        names = list(contenders)
        for name in names:  # warm-up: allocator, thread pool, connections
            await contenders[name](requests(f"warm-{name}", args.requests, 4))
        for rep in range(args.reps):
            for name in names[rep % 3:] + names[:rep % 3]:  # rotate who goes first
                reqs = requests(f"{name}-{rep}", args.requests, args.tokens)
                started, cpu = time.perf_counter(), time.process_time()
                items, tokens = await contenders[name](reqs)
                results[name].append((time.perf_counter() - started, items, tokens, time.process_time() - cpu))
        await engine.close()

    def median(name, field):
        return statistics.median(run[field] for run in results[name])

    def median_s(name):
        return median(name, 0)

    print(f"{args.requests} requests x {args.tokens} greedy tokens, {args.model} model, "
          f"median of {args.reps} (wall time until all finished)")
    print(f"{'how':<14}{'seconds':>10}{'tokens/s':>12}{'items':>9}{'tokens/item':>13}{'consumer CPU ms/1k tokens':>28}")
    # Greedy decoding of the same prompts: every contender delivers the same tokens (some
    # requests may end early at an end-of-sequence token, the same ones each time).
    delivered = {run[2] for runs in results.values() for run in runs}
    assert len(delivered) == 1, f"the contenders delivered different token counts: {results}"
    total = delivered.pop()
    figures = {}
    for name in names:
        seconds, items, cpu_ms = median_s(name), median(name, 1), 1e6 * median(name, 3) / total
        figures[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(total / seconds, 1), "items": items,
                         "consumer_cpu_ms_per_1k_tokens": round(cpu_ms, 2)}
        shown = "(engine here too)" if name == "in_process" else f"{cpu_ms:.1f}"
        print(f"{name:<14}{seconds:>10.3f}{total / seconds:>12.0f}{items:>9.0f}{total / items:>13.1f}{shown:>28}")
    ratio = median_s("per_request") / median_s("progress")
    ceiling = median_s("in_process") / median_s("progress")
    cpu_ratio = median("per_request", 3) / median("progress", 3)
    print(f"progress: {ratio:.2f}x the speed of per-request streams, {cpu_ratio:.1f}x less consumer CPU, "
          f"{ceiling:.2f}x the speed of the in-process engine")
    return {"benchmark": "rollout_stream", "model": args.model, "requests": args.requests,
            "tokens": args.tokens, "reps": args.reps, **{f"{k}_{m}": v[m] for k, v in figures.items() for m in v},
            "progress_vs_per_request": round(ratio, 3), "progress_vs_in_process": round(ceiling, 3),
            "per_request_vs_progress_consumer_cpu": round(cpu_ratio, 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", choices=["small-vocab", "tiny", "smollm2"], default="small-vocab")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
