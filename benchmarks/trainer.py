"""Trainer step time against a plain PyTorch policy-gradient step on the same batch.

The contender is `asystem.trainer.Trainer` (one rank, FSDP2 over a one-rank gloo group):
a training step recomputes theta_old log-probabilities (one forward pass without
gradients), then runs the IcePop loss with a forward and a backward pass, clips the
gradient norm and takes an AdamW step; it also computes the entropy and the metrics.

The baseline is the least a policy-gradient step can cost with the same model, batch and
precision: transformers' model without FSDP, one forward and backward pass of
-mean(advantage * log p) over the response tokens, and an AdamW step. Both see the same
16 sequences of about 100 tokens (prompt 20, responses 60-100) in one micro-batch. The
ratio trainer / baseline is the price of the theta_old pass, IcePop and FSDP.

Each configuration runs a warm-up step (unless `--no-warmup`), then `--steps` timed
steps; the median counts.
Contender and baseline alternate step by step, so load from other processes on a shared
machine hits both alike.

    .venv/bin/python benchmarks/trainer.py                # SmolLM2-135M, fp32 and bf16
    .venv/bin/python benchmarks/trainer.py --model tiny --steps 3 --dtypes fp32

Prints a table and, as its last line, a JSON object with the median step times and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from asystem.models import smollm2, tiny_llama
from asystem.trainer import Trainer, TrainerConfig
from asystem.trainer_ranks import free_port
from ring.trajectory import FinishReason, Trajectory

PROMPT_TOKENS = 20


def make_batch(sequences: int, vocab: int, seed: int = 0) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(sequences):
        n = int(torch.randint(60, 101, (1,), generator=g))
        batch.append(Trajectory(
            traj_id=i, group_id=i // 4, prompt_id=str(i // 4), sample_index=i % 4,
            prompt_tokens=torch.randint(0, vocab, (PROMPT_TOKENS,), generator=g).tolist(),
            response_tokens=torch.randint(0, vocab, (n,), generator=g).tolist(),
            infer_logprobs=(-5.0 - torch.rand(n, generator=g)).tolist(), versions=[0] * n,
            reward=float(torch.rand(1, generator=g)), finish_reason=FinishReason.EOS))
    return batch


class PlainStep:
    """The baseline: transformers + AdamW, no FSDP, no theta_old pass, no IcePop."""

    def __init__(self, model_path: str, dtype: str, batch: list[Trajectory]):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.01)
        self.autocast = dtype == "bf16"
        width = max(len(t.prompt_tokens) + len(t.response_tokens) for t in batch)
        self.ids = torch.zeros(len(batch), width, dtype=torch.int64)
        self.mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for b, t in enumerate(batch):
            tokens = t.prompt_tokens + t.response_tokens
            self.ids[b, :len(tokens)] = torch.tensor(tokens)
            self.mask[b, len(t.prompt_tokens):len(tokens)] = True
        self.adv = torch.randn(len(batch))

    def step(self) -> float:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=self.ids, use_cache=False).logits
        targets = self.mask[:, 1:]
        pred = logits[:, :-1][targets].float()
        logp = pred.gather(-1, self.ids[:, 1:][targets][:, None]).squeeze(-1) - pred.logsumexp(-1)
        adv = self.adv[:, None].expand_as(targets)[targets]
        (-(adv * logp).mean()).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return time.perf_counter() - started


def run(model_path: str, dtype: str, batch: list[Trajectory], steps: int, warmup: bool) -> dict:
    trainer = Trainer(TrainerConfig(model_path=model_path, dtype=dtype, lr=1e-6, micro_batch_tokens=4096))
    trainer.setup("127.0.0.1", free_port(), timeout_s=120)
    plain = PlainStep(model_path, dtype, batch)
    try:
        if warmup:
            trainer.train_step(batch)
            plain.step()
        ours, base, recompute, update = [], [], [], []
        for _ in range(steps):
            metrics = trainer.train_step(batch)
            ours.append(metrics["time_step_s"])
            recompute.append(metrics["time_logprob_s"])
            update.append(metrics["time_update_s"])
            base.append(plain.step())
    finally:
        trainer.close()
    med = statistics.median
    return {"dtype": dtype, "trainer_step_s": med(ours), "theta_old_s": med(recompute), "update_s": med(update),
            "baseline_step_s": med(base), "ratio": med(ours) / med(base),
            "tokens": metrics["tokens"], "sequences": metrics["sequences"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--no-warmup", action="store_true", help="time the first step too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = str(smollm2() if args.model == "smollm2" else tiny_llama())
    from transformers import AutoConfig

    batch = make_batch(args.sequences, AutoConfig.from_pretrained(model_path).vocab_size)
    results = [run(model_path, dtype, batch, args.steps, not args.no_warmup) for dtype in args.dtypes]

    print(f"{args.model}: {args.sequences} sequences, {results[0]['tokens']} response tokens "
          f"(+{PROMPT_TOKENS} prompt tokens each), {torch.get_num_threads()} threads, median of {args.steps}")
    print(f"{'dtype':<6}{'trainer step':>14}{'theta_old':>11}{'update':>9}{'baseline':>10}{'ratio':>7}")
    for r in results:
        print(f"{r['dtype']:<6}{r['trainer_step_s']:>13.2f}s{r['theta_old_s']:>10.2f}s{r['update_s']:>8.2f}s"
              f"{r['baseline_step_s']:>9.2f}s{r['ratio']:>7.2f}")
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "steps": args.steps,
                      **{f"{r['dtype']}_{k}": round(v, 4) for r in results for k, v in r.items()
                         if isinstance(v, float)}}))


if __name__ == "__main__":
    main()
