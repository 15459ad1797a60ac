"""Learning through the whole pipeline: engine, scheduler, reward workers, trainer, weight
broadcast, back to the engine.

The tiny recipe's random 2-layer Llama (SmolLM2's tokenizer) answers arithmetic prompts
with 8 tokens; the reward is the share of them that start a word (a custom verifier,
`tests/asystem/reward_verifiers.py:spaces`). The model starts near the vocabulary's
share of such tokens and can only do better by learning from its own samples, so a
rising reward shows that every part passes the right data on: the engine's tokens and
log-probabilities, the rewards, the advantages, the update, and the new weights.

The rise is not gradual: the reward stays near 0.66 for some steps, then climbs to 1
within a few. When the climb starts depends on the order in which the asynchronous parts
happen to run. At lr 2e-2 it started anywhere from step 10 to past step 16; at 5e-2 mostly
at steps 6-9, but once (in CI) at step 13; at 1e-1 at steps 4, 4, 5 and 7 in four runs. So
the test runs 20 steps at 1e-1: the climb may start as late as step 14.
"""

from __future__ import annotations

import asyncio
import statistics

import pytest

from asystem.config import load_config
from asystem.job import train
from asystem.metrics import read_jsonl
from asystem.train_config import TrainConfig
from launch.train import recipe_path

STEPS = 20


@pytest.mark.timeout(600)
def test_reward_rises_through_the_whole_pipeline(tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"run.out={out}", f"run.steps={STEPS}", "run.checkpoint_every=0", "run.eval_every=0",
        "task.source.verifier=tests.asystem.reward_verifiers:spaces", "task.eval_size=4",
        "rollout.max_tokens=8", "rollout.group_size=8", "scheduler.token_budget=512",
        "trainer.lr=1e-1",
    ]
    summary = asyncio.run(train(load_config(TrainConfig, recipe_path("tiny"), overrides)))
    assert summary["steps"] == STEPS
    records = read_jsonl(out / "metrics.jsonl")
    # Steps are timed from the start of training: the held-out evaluation before it and
    # the start-up belong to no step, so the steps' times add up to the training time.
    step_s = sum(r["time/step"] for r in records if "time/step" in r)
    assert step_s <= summary["train_s"] + 0.01, (step_s, summary["train_s"])
    rewards = [r["reward/mean"] for r in records if "reward/mean" in r]
    assert len(rewards) == STEPS
    first, last = statistics.mean(rewards[:3]), statistics.mean(rewards[-3:])
    assert last > first + 0.1, f"reward did not rise: {[round(r, 2) for r in rewards]}"
