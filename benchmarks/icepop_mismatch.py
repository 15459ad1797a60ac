"""IcePop in practice: a bf16 engine feeding an fp32 trainer, with and without the correction.

The engine samples in bf16 while the trainer computes log-probabilities in fp32, so the
probabilities behind each sampled token differ between the two (the training-inference
mismatch of RING1T.md 1). Each contender runs the same whole job (`asystem.job.train`:
torch engine, C3PO++, reward workers, weight broadcast) on the same task and seed, and
differs only in `trainer.icepop.method`:

- "icepop": tokens whose ratio k = p_train / p_infer leaves [alpha, beta] get no gradient;
- "grpo": no correction (plain GRPO with the PPO clip);
- "tis": truncated importance sampling, weight min(k, C) (with `--tis`).

The job is the pipeline test's (tests/asystem/test_learning.py): a tiny random Llama
learns to answer with tokens that start a word. A high learning rate (5e-2 by default)
sharpens its distribution within a few steps, which is where bf16 rounding moves the
probabilities most. Reported per contender: reward of the first and last steps, the
largest gradient norm, steps with a non-finite gradient (skipped), and the mismatch
metrics (`train/mismatch_abs_mean`, `train/mismatch_abs_max`, `train/masked_frac`,
`train/kl_k3`). Wall times are not the point here and are not compared.

    .venv/bin/python benchmarks/icepop_mismatch.py [--steps 24] [--lr 5e-2] [--hidden 64] [--tis]

The last line is one JSON object with each contender's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from asystem.config import load_config
from asystem.job import train
from asystem.metrics import read_jsonl
from asystem.train_config import TrainConfig
from launch.train import recipe_path


def run(method: str, args, out: Path) -> dict:
    overrides = [
        f"run.out={out}", f"run.steps={args.steps}", "run.checkpoint_every=0", "run.eval_every=0",
        "run.minutes=null", f"run.seed={args.seed}",
        "task.source.verifier=tests.asystem.reward_verifiers:spaces", "task.eval_size=4",
        "rollout.max_tokens=8", "rollout.group_size=8", "rollout.dtype=bfloat16", "scheduler.token_budget=512",
        "trainer.dtype=fp32", f"trainer.lr={args.lr}", f"trainer.icepop.method={method}",
    ]
    if args.hidden != 64:
        overrides.append(f"model.path={tiny_path(args.hidden)}")
    asyncio.run(train(load_config(TrainConfig, recipe_path("tiny"), overrides)))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    rewards = [r["reward/mean"] for r in rows]
    k = max(3, len(rows) // 5)

    def series(key):
        return [r.get(key, 0.0) for r in rows]

    return {
        "steps": len(rows),
        "reward_first": statistics.mean(rewards[:k]), "reward_last": statistics.mean(rewards[-k:]),
        "grad_norm_max": max(series("train/grad_norm")),
        "skipped_updates": sum(series("train/skipped_updates")),
        "mismatch_abs_mean": statistics.mean(series("train/mismatch_abs_mean")),
        "mismatch_abs_max": max(series("train/mismatch_abs_max")),
        "masked_frac_mean": statistics.mean(series("train/masked_frac")),
        "masked_frac_max": max(series("train/masked_frac")),
        "kl_k3_mean": statistics.mean(series("train/kl_k3")),
        "rewards": [round(r, 3) for r in rewards],
    }


def tiny_path(hidden: int) -> str:
    from asystem.models import tiny_llama

    return str(tiny_llama(hidden=hidden))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--hidden", type=int, default=64, help="tiny Llama width (64: the tests' model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tis", action="store_true", help="also truncated importance sampling")
    args = parser.parse_args()
    methods = ["icepop", "grpo"] + (["tis"] if args.tis else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            results[method] = run(method, args, Path(tmp) / method)
    print(f"\nbf16 engine, fp32 trainer, tiny Llama h{args.hidden}, lr {args.lr}, {args.steps} steps")
    print(f"{'method':8} {'reward first':>12} {'last':>6} {'grad max':>9} {'skipped':>8} "
          f"{'|d| mean':>9} {'|d| max':>8} {'masked':>8} {'masked max':>10} {'kl_k3':>9}")
    for method, r in results.items():
        print(f"{method:8} {r['reward_first']:12.3f} {r['reward_last']:6.3f} {r['grad_norm_max']:9.3f} "
              f"{r['skipped_updates']:8.0f} {r['mismatch_abs_mean']:9.5f} {r['mismatch_abs_max']:8.4f} "
              f"{r['masked_frac_mean']:8.5f} {r['masked_frac_max']:10.5f} {r['kl_k3_mean']:9.2e}")
    for method, r in results.items():
        print(f"  {method} rewards: {r['rewards']}")
    print(json.dumps({"steps": args.steps, "lr": args.lr, "hidden": args.hidden,
                      **{m: {k: v for k, v in r.items() if k != "rewards"} for m, r in results.items()}}))


if __name__ == "__main__":
    main()
