"""The two schedules in a running job: the sync one waits for the trainer, C3PO++ does not.

A real job (the tiny recipe: controller, torch-engine rollout worker, trainer rank, reward
worker) whose train steps are made to last at least a second longer, long enough for the
tiny engine to decode whole rollouts meanwhile. Staleness (the trainer's version minus the
version that sampled a token) then shows which schedule decoded during training.
"""

from __future__ import annotations

import asyncio

import pytest

from asystem.config import load_config
from asystem.job import train
from asystem.metrics import read_jsonl
from asystem.train_config import TrainConfig
from launch.train import recipe_path

SLOW_TRAIN_S = 1.0


def _slow_trainer(fleet) -> None:
    """Make every train step last SLOW_TRAIN_S longer (the trainer's time, then the wait)."""
    train_step = fleet.trainers.train_step

    async def slow_train_step(*args, **kwargs):
        metrics = await train_step(*args, **kwargs)
        await asyncio.sleep(SLOW_TRAIN_S)
        return metrics

    fleet.trainers.train_step = slow_train_step


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["sync", pytest.param("c3po", marks=pytest.mark.slow)])
async def test_only_c3po_decodes_while_the_trainer_trains(tmp_path, kind):
    steps = 4
    config = load_config(TrainConfig, recipe_path("tiny"), [
        f"run.out={tmp_path}", f"run.steps={steps}", "run.checkpoint_every=0", "task.eval_size=4",
        f"scheduler.kind={kind}", "scheduler.groups_per_step=2"])
    summary = await train(config, on_start=_slow_trainer)

    assert summary["steps"] == steps
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "staleness/max" in r]
    assert len(records) == steps
    staleness = [r["staleness/max"] for r in records]
    if kind == "sync":
        # Each step starts once the last step's weights are on the engine.
        assert staleness == [0] * steps
    else:
        # The engine went on with the next batch under the old weights.
        assert max(staleness) >= 1, staleness
