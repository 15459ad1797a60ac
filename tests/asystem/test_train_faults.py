"""Faults in a running job: a rollout worker and a reward worker die with SIGKILL mid-run.

The supervisor restarts the rollout worker, its rollouts go on as continuations, it gets
the current weights, and the job trains every step; the reward pool replaces its dead
worker and retries. Counters say what happened.
"""

from __future__ import annotations

import asyncio
import os
import signal
from urllib.parse import urlparse

import psutil
import pytest

from asystem.config import load_config
from asystem.job import train
from asystem.metrics import read_jsonl
from asystem.train_config import TrainConfig
from launch.train import recipe_path


def _pid_listening_on(address: str) -> int:
    port = urlparse(address).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise LookupError(f"no process listens on {address}")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_rollout_and_reward_workers_killed_mid_run(tmp_path):
    steps = 6
    config = load_config(TrainConfig, recipe_path("tiny"),
                         [f"run.out={tmp_path}", f"run.steps={steps}", "run.checkpoint_every=0"])
    fleet_ready: asyncio.Future = asyncio.get_running_loop().create_future()
    killed: list[str] = []

    def trained(step: int) -> bool:
        path = tmp_path / "metrics.jsonl"
        return path.exists() and any(r.get("step", 0) >= step and "reward/mean" in r for r in read_jsonl(path))

    async def kill_when(step: int, ref, what: str) -> None:
        while not trained(step):
            await asyncio.sleep(0.2)
        os.kill(_pid_listening_on(ref.address), signal.SIGKILL)
        killed.append(what)

    async def faults() -> None:
        fleet = await fleet_ready
        await kill_when(2, fleet.workers[0], "rollout worker")
        await kill_when(3, fleet.rewards._slots[0].ref, "reward worker")

    injector = asyncio.create_task(faults())
    summary = await train(config, on_start=fleet_ready.set_result)
    await asyncio.wait_for(injector, 5)

    assert killed == ["rollout worker", "reward worker"]
    assert summary["steps"] == steps
    counters = summary["counters"]
    assert counters["rollout_worker_failures"] >= 1 and counters["rollout_worker_restarts"] >= 1
    batches = read_jsonl(tmp_path / "batches.jsonl")
    assert [b["step"] for b in batches] == list(range(1, steps + 1))
    ids = [t[0] for b in batches for t in b["trajectories"]]
    assert len(ids) == len(set(ids))
