"""Sandbox executions against the naive way, `subprocess.run([python, file])`, in one run.

Both run the same small Python programs on this machine, one after another for start-up
latency and with `--concurrency` in flight for throughput:

- start-up latency: the time from asking for an execution of an empty program to having
  its result (so: process creation, isolation, teardown, reporting). p50 and p99.
- throughput: executions per second of a small program (sums a range, prints the result)
  with the same number in flight for both.

The naive way gets no isolation at all; the sandbox pays for its isolation and still has
to be faster: the report's ASandbox figure is ~100 ms start-up, and the target here is a
p50 start-up of at most 100 ms and at least 5x the naive throughput.

    .venv/bin/python benchmarks/sandbox.py [--isolation auto|namespaces|basic] [--quick]

The last output line is one JSON object with startup_p50_ms and throughput_ratio_vs_naive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from asystem.sandbox import Sandbox

EMPTY = "pass\n"
SMALL = "print(sum(range(10_000)))\n"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def naive_run(path: str) -> None:
    # The naive way, run in a thread so that several can be in flight, like the sandbox's.
    done = await asyncio.to_thread(subprocess.run, [sys.executable, path], capture_output=True,
                                   timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"naive run failed: {done.stderr.decode()[-500:]}")


async def latencies(run, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await run()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def throughput(run, n: int, concurrency: int) -> float:
    queue = iter(range(n))

    async def worker():
        for _ in queue:
            await run()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--isolation", default="auto", choices=["auto", "namespaces", "basic"])
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 20 s)")
    args = parser.parse_args()
    n_lat, n_naive_lat, n_tp, n_naive_tp = (100, 20, 200, 30) if args.quick else (400, 60, 1000, 120)

    with tempfile.TemporaryDirectory() as tmp:
        empty, small = os.path.join(tmp, "empty.py"), os.path.join(tmp, "small.py")
        Path(empty).write_text(EMPTY)
        Path(small).write_text(SMALL)
        t = time.perf_counter()
        async with Sandbox(workers=args.concurrency, isolation=args.isolation) as sandbox:
            pool_start_ms = (time.perf_counter() - t) * 1000

            async def sandboxed(source: str):
                result = await sandbox.run(source)
                if not result.ok:
                    raise RuntimeError(f"sandboxed run failed: {result}")

            await latencies(lambda: sandboxed(EMPTY), 10)  # warm-up, both sides
            await latencies(lambda: naive_run(empty), 3)
            # Interleave the contenders so that a noisy neighbour hurts both alike.
            sb_lat, nv_lat, sb_tp, nv_tp = [], [], [], []
            rounds = 4
            for _ in range(rounds):
                sb_lat += await latencies(lambda: sandboxed(EMPTY), n_lat // rounds)
                nv_lat += await latencies(lambda: naive_run(empty), n_naive_lat // rounds)
                sb_tp.append(await throughput(lambda: sandboxed(SMALL), n_tp // rounds, args.concurrency))
                nv_tp.append(await throughput(lambda: naive_run(small), n_naive_tp // rounds, args.concurrency))
            isolation = sandbox.isolation["mode"]

    sb_rate, nv_rate = statistics.median(sb_tp), statistics.median(nv_tp)
    report = {
        "isolation": isolation,
        "concurrency": args.concurrency,
        "pool_start_ms": round(pool_start_ms, 1),
        "startup_p50_ms": round(percentile(sb_lat, 0.5), 2),
        "startup_p99_ms": round(percentile(sb_lat, 0.99), 2),
        "naive_startup_p50_ms": round(percentile(nv_lat, 0.5), 2),
        "naive_startup_p99_ms": round(percentile(nv_lat, 0.99), 2),
        "executions_per_s": round(sb_rate, 1),
        "naive_executions_per_s": round(nv_rate, 1),
        "throughput_ratio_vs_naive": round(sb_rate / nv_rate, 2),
        "startup_ratio_vs_naive": round(percentile(nv_lat, 0.5) / percentile(sb_lat, 0.5), 2),
    }
    print(f"{'':24}{'sandbox':>12}{'naive':>12}")
    print(f"{'start-up p50 (ms)':24}{report['startup_p50_ms']:>12}{report['naive_startup_p50_ms']:>12}")
    print(f"{'start-up p99 (ms)':24}{report['startup_p99_ms']:>12}{report['naive_startup_p99_ms']:>12}")
    print(f"{'executions/s':24}{report['executions_per_s']:>12}{report['naive_executions_per_s']:>12}")
    print(f"isolation: {isolation}; pool start-up {report['pool_start_ms']} ms; targets: start-up "
          f"p50 <= 100 ms ({'met' if report['startup_p50_ms'] <= 100 else 'NOT met'}), throughput "
          f">= 5x naive ({'met' if report['throughput_ratio_vs_naive'] >= 5 else 'NOT met'})")
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
