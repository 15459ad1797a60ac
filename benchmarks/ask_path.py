"""The Python cost of an ask, without the noise of a second process.

Two ActorSystems in this process (CURVE on, TCP over loopback, as across processes) and an
Echo actor in the second: the caller's and the callee's work both run on this one thread,
so the time per call is the whole ask path, both sides together. Two figures:

- pipelined: 64 asks in flight, microseconds per call (the Python work; I/O overlaps);
- round trip: one ask in flight, microseconds per call (adds ZeroMQ's latency).

Each also as the event-loop thread's CPU time per call (``*_cpu_us``): that leaves out
time spent waiting for other threads and processes, so it varies much less from run to run
on a busy machine and is the figure to compare checkouts by.

``--profile`` prints cProfile's top functions for the pipelined run. Compare two checkouts
by running this script from each, interleaved, several times: the machine is noisy.

    .venv/bin/python benchmarks/ask_path.py [--calls 64000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from actors import Actor, ActorSystem
from actors.runtime import new_event_loop

WINDOW = 64
PAYLOAD = b"x" * 16


class Echo(Actor):
    async def echo(self, value):
        return value


async def measure(calls: int, profile: bool) -> dict:
    secret = b"ask-path-benchmark-secret-000000"
    async with ActorSystem(secret=secret) as caller, ActorSystem(secret=secret) as callee:
        ref = await callee.spawn(Echo)
        ask = caller.ask

        async def worker(n: int) -> None:
            for _ in range(n):
                await ask(ref, "echo", (PAYLOAD,), {}, None)

        await asyncio.gather(*(worker(50) for _ in range(WINDOW)))  # warm up
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        start, cpu = time.perf_counter(), time.thread_time()
        await asyncio.gather(*(worker(calls // WINDOW) for _ in range(WINDOW)))
        pipelined = (time.perf_counter() - start) / (calls // WINDOW * WINDOW)
        pipelined_cpu = (time.thread_time() - cpu) / (calls // WINDOW * WINDOW)
        if profiler:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        rtt_calls = max(1000, calls // 8)
        start, cpu = time.perf_counter(), time.thread_time()
        await worker(rtt_calls)
        rtt = (time.perf_counter() - start) / rtt_calls
        rtt_cpu = (time.thread_time() - cpu) / rtt_calls
    us = {"pipelined_us_per_call": pipelined, "pipelined_cpu_us_per_call": pipelined_cpu,
          "rtt_us": rtt, "rtt_cpu_us": rtt_cpu}
    return {key: round(value * 1e6, 1) for key, value in us.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=64000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        result = runner.run(measure(args.calls, args.profile))
    print(f"pipelined, {WINDOW} in flight: {result['pipelined_us_per_call']} us per call "
          f"(both sides), {result['pipelined_cpu_us_per_call']} us of it on the loop's CPU")
    print(f"round trip, 1 in flight: {result['rtt_us']} us, {result['rtt_cpu_us']} us of it "
          "on the loop's CPU")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
