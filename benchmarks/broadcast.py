"""Weight broadcast: WeightSender -> WeightReceiver against a raw torch.distributed broadcast.

Two processes on this host: this one is the trainer (rank 0), a spawned one the engine
(rank 1). The payload is SmolLM2-135M-Instruct's bf16 state (`asystem.models.smollm2()`,
272 tensors, 269 MB), each tensor in its own allocation, as a trainer holds them.

Contenders, in a rotating order each repetition, after one untimed warm-up round:

- raw: `torch.distributed.broadcast` of one flat uint8 buffer of the same total size over a
  default gloo group, into a buffer the receiver allocated once, then a one-element
  `all_reduce`, so that the clock stops, as for ours, when the receiver has everything.
- raw_fresh (reference): the same into a buffer allocated for each broadcast, as a receiver
  that hands out new tensors must; on this VM first-touch page faults cost more than the
  transfer itself.
- ours: `WeightSender.send` / `WeightReceiver.receive` over their own group (agreement,
  buckets, ack). The receiver drops the tensors after each update, as an engine does once it
  has loaded them.

Every figure is timed on the sender, from a barrier to the return, and is the median over the
repetitions. CPU time (both processes, all threads, from `time.process_time`) is reported
beside it: on a shared, loaded host wall time follows how much CPU a contender needs.

    .venv/bin/python benchmarks/broadcast.py [--repeats 11] [--bucket-kib 1024] [--depth 4] [--sweep]

`--sweep` also times ours with other bucket sizes and depths (about 90 s in all). Prints a
table and, as its last line, one JSON object: the medians in seconds, `transfer_ratio_vs_raw`
= ours / raw of the medians (lower is better; target <= 1.25), `best_ratio_vs_raw` of the
fastest runs, `cpu_ratio_vs_raw` of the CPU times, and the same ratios per swept setting.
"""

from __future__ import annotations

import argparse
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

from asystem.models import smollm2
from asystem.weights import (
    DEFAULT_BUCKET_BYTES,
    DEPTH,
    BucketPlan,
    WeightGroup,
    WeightReceiver,
    WeightSender,
    WeightSyncSpec,
    free_port,
)

TARGET = 1.25
DEADLINE_S = 120.0  # any single step; the run is a few minutes at most
SWEEP = [(256, 4), (1024, 2), (1024, 8), (4096, 4), (16384, 4), (65536, 4)]  # (KiB, depth)


def label(bucket_kib: int, depth: int) -> str:
    return f"ours_{bucket_kib}KiB_d{depth}"


def contenders(config: dict) -> list[str]:
    return ["raw", "raw_fresh", *config["ours"]]


def rotated(names: list[str], rep: int) -> list[str]:
    k = rep % len(names)
    return names[k:] + names[:k]


def plan_for(config: dict, name: str, version: int) -> BucketPlan:
    base = BucketPlan.from_dict(config["ours"][name]["plan"])
    return BucketPlan(version, base.buckets)


def join_default(config: dict, rank: int) -> None:
    store = dist.TCPStore("127.0.0.1", config["default_port"], 2, rank == 0, timedelta(seconds=DEADLINE_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=DEADLINE_S))


def join_weights(config: dict, rank: int) -> WeightGroup:
    spec = WeightSyncSpec("127.0.0.1", config["weight_port"], 2, timeout_s=DEADLINE_S)
    return WeightGroup.join(spec, rank)


def raw_round(flat: torch.Tensor) -> None:
    dist.broadcast(flat, 0)
    dist.all_reduce(torch.ones(1))  # the receipt: the receiver has every byte


def receiver(conn) -> None:
    """The engine's process: mirrors the sender's schedule."""
    config = json.loads(conn.recv_bytes())
    join_default(config, 1)
    group = join_weights(config, 1)
    flat = torch.zeros(config["total_bytes"], dtype=torch.uint8)  # touched once, like the sender's
    ends = {name: WeightReceiver(group, depth=spec["depth"]) for name, spec in config["ours"].items()}
    cpu: dict[str, list[float]] = {name: [] for name in contenders(config)}
    for rep in range(-1, config["repeats"]):
        for name in rotated(contenders(config), rep):
            plan = plan_for(config, name, rep + 2) if name in config["ours"] else None  # came in a message
            dist.barrier()
            start = time.process_time()
            if name == "raw":
                raw_round(flat)
            elif name == "raw_fresh":
                raw_round(torch.empty(config["total_bytes"], dtype=torch.uint8))
            else:
                named = ends[name].receive(plan, DEADLINE_S)
                del named  # loaded and dropped, as an engine does
            if rep >= 0:
                cpu[name].append(time.process_time() - start)
    group.close()
    dist.destroy_process_group()
    conn.send_bytes(json.dumps(cpu).encode())


def run(args: argparse.Namespace) -> dict:
    # Cloned: load_file's tensors map the file; a trainer's live in ordinary memory.
    state = [(name, t.clone()) for name, t in load_file(str(smollm2() / "model.safetensors")).items()]
    configs = SWEEP if args.sweep else []
    chosen = (args.bucket_kib, args.depth)
    ours = {}
    for bucket_kib, depth in [chosen, *[c for c in configs if c != chosen]]:
        plan = BucketPlan.build(0, state, bucket_bytes=bucket_kib << 10)
        ours[label(bucket_kib, depth)] = {"plan": plan.to_dict(), "depth": depth, "buckets": len(plan.buckets)}
    total = BucketPlan.build(0, state).total_bytes
    config = {"default_port": free_port(), "weight_port": free_port(), "repeats": args.repeats,
              "total_bytes": total, "ours": ours}

    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=receiver, args=(child_conn,), daemon=True)
    child.start()
    try:
        conn.send_bytes(json.dumps(config).encode())
        join_default(config, 0)
        group = join_weights(config, 0)
        flat = torch.zeros(total, dtype=torch.uint8)
        ends = {name: WeightSender(group, depth=spec["depth"]) for name, spec in ours.items()}
        times: dict[str, list[float]] = {name: [] for name in contenders(config)}
        cpu: dict[str, list[float]] = {name: [] for name in contenders(config)}
        packed: dict[str, int] = {}
        for rep in range(-1, args.repeats):  # rep -1 warms up
            for name in rotated(contenders(config), rep):
                plan = plan_for(config, name, rep + 2) if name in ours else None
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                if name in ("raw", "raw_fresh"):
                    raw_round(flat)
                else:
                    stats = ends[name].send(plan, state, DEADLINE_S)
                    packed[name] = stats.packed_bytes
                if rep >= 0:
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
        if not conn.poll(DEADLINE_S):
            raise TimeoutError(f"receiver pid {child.pid} did not finish within {DEADLINE_S}s")
        for name, values in json.loads(conn.recv_bytes()).items():  # both ends' CPU time
            cpu[name] = [mine + theirs for mine, theirs in zip(cpu[name], values)]
        group.close()
        dist.destroy_process_group()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    return summarize(config, times, cpu, packed, label(*chosen))


def summarize(config: dict, times: dict[str, list[float]], cpu: dict[str, list[float]], packed: dict[str, int],
              chosen: str) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    total = config["total_bytes"]
    print(f"{total / 1e6:.0f} MB, {len(times['raw'])} repetitions, medians (min-max):")
    for name, values in times.items():
        extra = ""
        if name in config["ours"]:
            spec = config["ours"][name]
            extra = (f"  {spec['buckets']} buckets, {packed[name] / 1e6:.0f} MB packed, "
                     f"ratio {medians[name] / medians['raw']:.2f}")
        print(f"  {name:<20} {medians[name] * 1e3:8.1f} ms ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})"
              f"  {total / medians[name] / 1e9:5.2f} GB/s  cpu {cpu_medians[name] * 1e3:6.1f} ms{extra}")
    ratio = medians[chosen] / medians["raw"]
    return {
        "bytes": total, "repeats": len(times["raw"]), "ours": chosen,
        "raw_s": medians["raw"], "raw_fresh_s": medians["raw_fresh"], "ours_s": medians[chosen],
        "transfer_ratio_vs_raw": ratio, "target": TARGET, "met": ratio <= TARGET,
        "best_ratio_vs_raw": min(times[chosen]) / min(times["raw"]),  # the least disturbed runs
        "cpu_raw_s": cpu_medians["raw"], "cpu_ours_s": cpu_medians[chosen],
        "cpu_ratio_vs_raw": cpu_medians[chosen] / cpu_medians["raw"],
        "sweep_ratios": {name: medians[name] / medians["raw"] for name in config["ours"]},
        "sweep_cpu_ratios": {name: cpu_medians[name] / cpu_medians["raw"] for name in config["ours"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--bucket-kib", type=int, default=DEFAULT_BUCKET_BYTES["cpu"] >> 10,
                        help="bucket size of the reported figure (default: the library's CPU default)")
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--sweep", action="store_true", help="also time other bucket sizes and depths")
    result = run(parser.parse_args())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
