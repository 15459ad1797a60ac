"""The vLLM engine's weight sync and rollout throughput, each against its baseline.

Everything is measured in one run, on one running VLLMEngine (asystem/vllm_engine.py) over
SmolLM2-135M-Instruct in bf16 (`asystem.models.smollm2()`, 272 tensors, 269 MB):

1. **Weight sync.** This process is the trainer (weight-group rank 0) and broadcasts the
   model's bf16 state into the engine (`join_weight_group` + `receive_weights`): vLLM's worker
   receives the buckets itself and reloads them in place. Reported: the transfer (the
   worker's receive, from the agreement to the ack, as the worker times it), the in-place
   load, and the whole `receive_weights` call. Baseline, interleaved with ours in a rotating
   order: `torch.distributed.broadcast` of one flat uint8 buffer of the same size between this
   process and a spawned one over a default gloo group, then a one-element all-reduce so that
   the clock stops when the receiver has every byte (benchmarks/broadcast.py's "raw").
   `transfer_ratio_vs_raw` = transfer / raw (target <= 1.25).
2. **Rollout throughput.** The same prompts (e.g. 32 prompts x 64 tokens, temperature 1,
   one seed per prompt, so both produce the very same tokens) through `VLLMEngine.generate`
   and straight through vLLM's `AsyncLLM.generate` on the engine's own AsyncLLM (same
   process, same engine, same sampling parameters): the difference is exactly this layer.
   `rollout_ratio_vs_vllm` = ours / direct in tokens/s (target >= 0.9). With `--worker`,
   also through a RolloutWorker actor in its own process (its own vLLM engine, started
   after the first one is closed).

Figures are medians over the repetitions, after one warm-up round; wall times on a shared,
loaded host are noisy, and the ratios come from interleaved runs for that reason.

    .venv/bin/python benchmarks/weights.py [--repeats 5] [--rollout-repeats 3] [--prompts 32]
                                           [--tokens 64] [--worker]

The last line is one JSON object with `transfer_ratio_vs_raw` and `rollout_ratio_vs_vllm`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled; ahead of benchmarks/

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from asystem.engine import GenerationRequest, SamplingParams
from asystem.models import smollm2
from asystem.weights import (
    BucketPlan,
    WeightGroup,
    WeightSender,
    WeightSyncSpec,
    free_port,
)

TRANSFER_TARGET = 1.25
ROLLOUT_TARGET = 0.9
DEADLINE_S = 120.0  # any single step


# --- 1. weight sync ------------------------------------------------------------------------


def raw_receiver(port: int, nbytes: int, rounds: int) -> None:
    """The raw baseline's other process: one flat buffer, allocated and touched once."""
    store = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=DEADLINE_S))
    dist.init_process_group("gloo", store=store, rank=1, world_size=2, timeout=timedelta(seconds=DEADLINE_S))
    flat = torch.zeros(nbytes, dtype=torch.uint8)
    for _ in range(rounds):
        raw_round(flat)
    dist.destroy_process_group()


def raw_round(flat: torch.Tensor) -> None:
    dist.broadcast(flat, 0)
    dist.all_reduce(torch.ones(1))  # the receipt: the receiver has every byte


async def bench_sync(engine, repeats: int, bucket_bytes: int | None) -> dict:
    # Cloned: load_file's tensors map the file; a trainer's live in ordinary memory.
    state = [(name, t.clone()) for name, t in load_file(str(smollm2() / "model.safetensors")).items()]
    nbytes = BucketPlan.build(0, state).total_bytes
    raw_port = free_port()
    child = multiprocessing.get_context("spawn").Process(
        target=raw_receiver, args=(raw_port, nbytes, repeats + 1), daemon=True)
    child.start()
    store = dist.TCPStore("127.0.0.1", raw_port, 2, True, timedelta(seconds=DEADLINE_S))
    await asyncio.to_thread(dist.init_process_group, "gloo", store=store, rank=0, world_size=2,
                            timeout=timedelta(seconds=DEADLINE_S))
    spec = WeightSyncSpec("127.0.0.1", free_port(), 2, timeout_s=DEADLINE_S)
    joining = asyncio.create_task(engine.join_weight_group(spec, 1))
    group = await asyncio.to_thread(WeightGroup.join, spec, 0)
    await joining
    sender, flat = WeightSender(group), torch.zeros(nbytes, dtype=torch.uint8)
    figures: dict[str, list[float]] = {"raw": [], "send": [], "transfer": [], "load": [], "receive_weights": []}
    try:
        for rep in range(-1, repeats):  # rep -1 warms up
            for name in (["raw", "ours"] if rep % 2 else ["ours", "raw"]):
                if name == "raw":
                    start = time.perf_counter()
                    await asyncio.to_thread(raw_round, flat)
                    took = {"raw": time.perf_counter() - start}
                else:
                    took = await sync_once(engine, sender, state, engine.version + 1, bucket_bytes)
                if rep >= 0:
                    for key, value in took.items():
                        figures[key].append(value)
    finally:
        group.close()
        dist.destroy_process_group()
        child.join(10)
        if child.is_alive():
            child.kill()
    medians = {key: statistics.median(values) for key, values in figures.items()}
    buckets = len(BucketPlan.build(0, state, bucket_bytes).buckets)
    print(f"weight sync: {nbytes / 1e6:.0f} MB in {buckets} buckets, {repeats} repetitions, medians (min-max):")
    for key, values in figures.items():
        print(f"  {key:<16} {medians[key] * 1e3:8.1f} ms ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})"
              f"  {nbytes / medians[key] / 1e9:5.2f} GB/s")
    ratio = medians["transfer"] / medians["raw"]
    print(f"  transfer / raw = {ratio:.2f} (target <= {TRANSFER_TARGET})")
    return {"bytes": nbytes, "buckets": buckets, "sync_repeats": repeats, **{f"{k}_s": v for k, v in medians.items()},
            "transfer_ratio_vs_raw": ratio, "transfer_target": TRANSFER_TARGET,
            "transfer_met": ratio <= TRANSFER_TARGET,
            "best_transfer_ratio_vs_raw": min(figures["transfer"]) / min(figures["raw"])}


async def sync_once(engine, sender: WeightSender, state, version: int, bucket_bytes: int | None) -> dict[str, float]:
    plan = BucketPlan.build(version, state, bucket_bytes)
    start = time.perf_counter()
    receiving = asyncio.create_task(engine.receive_weights(plan.to_dict(), DEADLINE_S))
    stats = await asyncio.to_thread(sender.send, plan, state, DEADLINE_S)
    await receiving
    took = engine.last_weight_update
    assert engine.version == version
    return {"send": stats.seconds, "transfer": took["receive_s"], "load": took["load_s"],
            "receive_weights": time.perf_counter() - start}


# --- 2. rollout throughput -----------------------------------------------------------------


def prompts(n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    return [tokenizer(f"Question {i}: what is {i * 7 % 13} plus {i * 5 % 11}? Answer:")["input_ids"]
            for i in range(n)]


async def through_engine(engine, batch: list[list[int]], tokens: int, tag: str) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        sampling = SamplingParams(temperature=1.0, max_tokens=tokens, seed=1000 + i)
        out = []
        async for chunk in engine.generate(GenerationRequest(f"{tag}-{i}", prompt, sampling)):
            out += chunk.tokens
        return out

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))


async def through_vllm(llm, batch: list[list[int]], tokens: int, tag: str) -> list[list[int]]:
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VLLMSamplingParams

    async def one(i: int, prompt: list[int]) -> list[int]:
        params = VLLMSamplingParams(temperature=1.0, top_p=1.0, max_tokens=tokens, seed=1000 + i, logprobs=0,
                                    output_kind=RequestOutputKind.DELTA, detokenize=False)
        out = []
        async for result in llm.generate(tokens_input(prompt), params, f"{tag}-{i}"):
            out += result.outputs[0].token_ids
        return out

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))


async def through_worker(ref, batch: list[list[int]], tokens: int, tag: str) -> list[list[int]]:
    requests = [GenerationRequest(f"{tag}-{i}", p, SamplingParams(temperature=1.0, max_tokens=tokens,
                                                                  seed=1000 + i)).to_dict()
                for i, p in enumerate(batch)]
    out: dict[str, list[int]] = {r["request_id"]: [] for r in requests}
    left = set(out)
    await ref.ask("submit", requests)
    async for chunks in ref.stream("progress", window=64):
        for c in chunks:
            out[c["request_id"]] += c["tokens"]
            if c["finish_reason"]:
                left.discard(c["request_id"])
        if not left:
            break
    return [out[r["request_id"]] for r in requests]


async def bench_rollout(contenders: dict, batch: list[list[int]], tokens: int, repeats: int) -> dict:
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, list[list[int]]] = {}
    names = list(contenders)
    for rep in range(-1, repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            outputs[name] = await contenders[name](batch, tokens, f"{name}{rep}")
            elapsed = time.perf_counter() - start
            if rep >= 0:
                rates[name].append(sum(map(len, outputs[name])) / elapsed)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"rollout: {len(batch)} prompts x {tokens} tokens, {repeats} repetitions, tokens/s medians (min-max):")
    for name, values in rates.items():
        print(f"  {name:<16} {medians[name]:8.1f} ({min(values):.1f}-{max(values):.1f})"
              f"  ratio {medians[name] / medians['vllm']:.2f}")
    same = all(outputs[name] == outputs["vllm"] for name in outputs)
    print(f"  same tokens from every contender: {same}")
    ratio = medians["engine"] / medians["vllm"]
    result = {"prompts": len(batch), "tokens": tokens, "rollout_repeats": repeats,
              "tokens_per_s": medians, "rollout_ratio_vs_vllm": ratio, "rollout_target": ROLLOUT_TARGET,
              "rollout_met": ratio >= ROLLOUT_TARGET, "same_tokens": same}
    if "worker" in medians:
        result["worker_ratio_vs_vllm"] = medians["worker"] / medians["vllm"]
    return result


# --- the run -------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict:
    from asystem.vllm_engine import VLLMEngine

    engine = VLLMEngine(smollm2(), kv_cache_bytes=512 << 20, max_model_len=1024, max_batch=args.prompts)
    start = time.perf_counter()
    await engine.start()
    result: dict = {"engine_start_s": time.perf_counter() - start}
    try:
        result |= await bench_sync(engine, args.repeats, args.bucket_kib and args.bucket_kib << 10)
        if args.no_rollout:
            return result
        batch = prompts(args.prompts)
        contenders = {"engine": lambda *a: through_engine(engine, *a),
                      "vllm": lambda *a: through_vllm(engine.llm, *a)}
        rollout = await bench_rollout(contenders, batch, args.tokens, args.rollout_repeats)
    finally:
        await engine.close()
    if args.worker:
        rollout = await with_worker(batch, args, rollout)
    return result | rollout


async def with_worker(batch, args, rollout: dict) -> dict:
    """The RolloutWorker path alone against direct vLLM measured before: a second engine in
    its own process; the figure is its ratio to the direct figure above."""
    from actors import ActorSystem
    from asystem.rollout import RolloutWorker, WorkerConfig

    config = WorkerConfig(model=str(smollm2()), backend="vllm", max_batch=args.prompts,
                          engine_options={"kv_cache_bytes": 512 << 20, "max_model_len": 1024})
    system = await ActorSystem().start()
    try:
        ref = await system.spawn(RolloutWorker, config.to_dict(), where="process", timeout=config.start_timeout_s + 60)
        rates = []
        for rep in range(-1, args.rollout_repeats):
            start = time.perf_counter()
            out = await through_worker(ref, batch, args.tokens, f"worker{rep}")
            if rep >= 0:
                rates.append(sum(map(len, out)) / (time.perf_counter() - start))
    finally:
        await system.shutdown()
    worker = statistics.median(rates)
    print(f"  worker (own engine) {worker:8.1f} tokens/s, ratio {worker / rollout['tokens_per_s']['vllm']:.2f}"
          " against the direct figure above (not interleaved)")
    rollout["tokens_per_s"]["worker"] = worker
    rollout["worker_ratio_vs_vllm"] = worker / rollout["tokens_per_s"]["vllm"]
    return rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="weight-sync repetitions")
    parser.add_argument("--rollout-repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help="also through a RolloutWorker actor (own engine)")
    parser.add_argument("--bucket-kib", type=int, default=None, help="bucket size (default: the library's)")
    parser.add_argument("--no-rollout", action="store_true", help="the weight sync only")
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
