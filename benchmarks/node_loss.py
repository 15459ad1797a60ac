"""How long a job takes to declare a node dead, against the interval it was configured with.

A real node agent runs on 127.0.0.2 (a separate process, as a node would); the job's
ActorSystem watches it exactly as a job on a cluster does (`asystem.cluster.watch_node`,
heartbeats every `heartbeat_s`, dead after `dead_after_s`). Two ways to lose it:

- frozen (SIGSTOP): connected and silent, like a hung host or a cut cable; only the
  heartbeats can tell. The baseline is the configured `dead_after_s`: ratio = measured /
  configured (the promise is "within the configured interval", plus one heartbeat).
- killed (SIGKILL): the kernel closes its connections; no heartbeat is needed. The
  baseline is the frozen case with the same settings, measured in the same run.

    .venv/bin/python benchmarks/node_loss.py [--intervals 1 2 4] [--repeat 2]

Prints a table and, as its last line, one JSON object: per interval the median seconds
to declare a frozen node dead and its ratio to the interval; the killed case's seconds and
its ratio to the frozen case at the shortest interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors import ActorSystem
from asystem.cluster import Cluster, watch_node
from asystem.config import from_dict
from asystem.placement import Node, Placement
from asystem.train_config import ClusterConfig


async def declare_dead(how: int, dead_after_s: float) -> float:
    """Seconds from the signal to the node declared dead."""
    config = from_dict(ClusterConfig, {"heartbeat_s": min(1.0, dead_after_s / 4), "dead_after_s": dead_after_s})
    cluster = Cluster([], head="", host="127.0.0.1", secret=os.urandom(32), report=lambda message: None)
    system = await ActorSystem(**{**cluster.system_options(config), "head": None}).start()
    env = {**os.environ, "ASYSTEM_SECRET": system.secret.hex(), "PYTHONPATH": str(ROOT)}
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.agent", "--bind", "tcp://127.0.0.2:0", "--head", system.address,
        "--node", "node1", env=env, stdout=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(agent.stdout.readline(), 60)
        node = Node("node1", 1, "127.0.0.2", (), await system.lookup("agent/node1"))
        placement = Placement(config, [node])
        await watch_node(system, node, placement, cluster, config)
        await asyncio.sleep(2 * config.heartbeat_s)  # a few heartbeats answered first
        started = time.perf_counter()
        os.kill(agent.pid, how)
        async with asyncio.timeout(10 * dead_after_s + 30):
            while "node1" not in placement.dead:
                await asyncio.sleep(0.01)
        return time.perf_counter() - started
    finally:
        agent.kill()
        await agent.wait()
        await system.shutdown()


async def main(intervals: list[float], repeat: int) -> dict:
    frozen = {}
    for interval in intervals:
        times = [await declare_dead(signal.SIGSTOP, interval) for _ in range(repeat)]
        frozen[interval] = statistics.median(times)
        print(f"frozen, dead_after_s={interval:g}: {frozen[interval]:.2f}s  ratio {frozen[interval] / interval:.2f}",
              flush=True)
    shortest = min(intervals)
    killed = statistics.median([await declare_dead(signal.SIGKILL, shortest) for _ in range(repeat)])
    print(f"killed, dead_after_s={shortest:g}: {killed:.3f}s  ratio to frozen {killed / frozen[shortest]:.3f}")
    return {"frozen_s": {str(k): round(v, 3) for k, v in frozen.items()},
            "frozen_ratio_to_interval": {str(k): round(v / k, 3) for k, v in frozen.items()},
            "killed_s": round(killed, 4), "killed_ratio_to_frozen": round(killed / frozen[shortest], 4),
            "repeat": repeat}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the losses are on purpose
    print(json.dumps(asyncio.run(main(args.intervals, args.repeat))))
