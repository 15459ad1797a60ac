"""C3PO++ against synchronous rollouts: a discrete-event simulation of a decode fleet.

This is a timing simulation. It drives the real schedulers of ring/scheduler.py with a
model of how long decoding and training take; it samples no text, computes no reward and
trains nothing, so it says nothing about learning. The report's claim that reward curves
match the synchronous baseline is not tested here.

The model (every time is in units of one decode iteration of a lone sequence):
- Fleet: N = prompts_per_step * G decode slots with continuous batching. One iteration
  advances every busy slot by one token and takes  a + b * busy  (a = 1; b = x / N, so a
  full-batch iteration costs 1 + x: decoding is memory-bound, batching is cheap).
  Prefill, prompt length and weight-sync time are ignored.
- Responses: log-normal lengths, capped at max_len ("length" finish; else "eos"). The log
  has a per-prompt part (hard prompts are long for every sample) and a per-sample part.
  The defaults give mean / max ~ 1/4 and ~3% truncated responses: the long tail of
  reasoning RL (Ring-1T: 64k maximum, scaled down 8x here; the ratios are what matter).
- Training: a step costs  c * (its response tokens), with c set so that the trainer digests
  tokens train_speed times as fast as the full fleet decodes them (1 = a balanced design).
- Synchronous: each step starts prompts_per_step groups and trains when all have ended.
- C3PO++: Omega_infer = N, token budget Phi (default: the synchronous step's expected
  tokens, so both steps train as much), retention limit sigma; the scheduler decides.
  Without overlap (the report's loop), decoding pauses while training runs. With overlap,
  decoding continues under the old weights during training (admitting new prompts only
  while the next budget is unmet); a step starts training when it is ready and the trainer
  is free. The synchronous schedule has nothing to decode while training.

Measured over the steps after a warm-up (C3PO++ starts with an empty pipeline): rollout
time per step (from the step's start to ready()), end-to-end time per step, tokens per
step, staleness (policy version trained minus version that sampled each token), and what
the retention limit drops.

    .venv/bin/python benchmarks/c3po.py [--out runs/c3po.png] [--steps 30] [--sigma 4]

Prints a table and, as its last line, a JSON object with rollout_speedup and e2e_speedup.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gc
import heapq
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from ring.scheduler import C3POConfig, C3POScheduler, RolloutScheduler, SyncConfig, SyncScheduler  # noqa: E402
from ring.trajectory import Prompt  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """The simulated system. Defaults: Ring-1T's shape, scaled down (see the module docstring)."""

    prompts_per_step: int = 32
    group_size: int = 8
    max_len: int = 8192
    median_len: float = 1240.0
    prompt_sigma: float = 0.8
    sample_sigma: float = 0.6
    full_batch_extra: float = 1.0
    """x: a full-batch decode iteration costs 1 + x lone-sequence iterations."""
    train_speed: float = 1.0
    """Trainer tokens/time over the full fleet's decode tokens/time."""
    seed: int = 0

    @property
    def slots(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def per_seq_cost(self) -> float:  # b
        return self.full_batch_extra / self.slots

    @property
    def train_cost(self) -> float:  # c, time per trained token
        full_batch_throughput = self.slots / (1.0 + self.full_batch_extra)
        return 1.0 / (self.train_speed * full_batch_throughput)

    def expected_len(self) -> float:
        """Mean capped response length, estimated once from 200k draws of the model."""
        rng = np.random.default_rng(12345)
        z = rng.standard_normal((2, 200_000))
        log_len = math.log(self.median_len) + self.prompt_sigma * z[0] + self.sample_sigma * z[1]
        return float(np.minimum(np.exp(log_len), self.max_len).mean())


class Prompts:
    """Endless prompts p0, p1, ...; their lengths live in ResponseLengths."""

    def __init__(self) -> None:
        self.next_index = 0

    def __iter__(self):
        return self

    def __next__(self) -> Prompt:
        self.next_index += 1
        return Prompt(f"p{self.next_index - 1}", (0,))


class ResponseLengths:
    """Lengths of a group's responses, a function of (seed, prompt, attempt) only, so every
    schedule sees the same responses to the same prompt (a paired comparison)."""

    CHUNK = 4096  # prompts per pre-drawn block: one generator per group would dominate the run time

    def __init__(self, setting: Setting) -> None:
        self.s = setting
        self.attempts: Counter[str] = Counter()
        self._rng = np.random.default_rng([setting.seed, 0])
        self._z = np.empty((0, 1 + setting.group_size))  # per prompt: its own z, then G sample z's

    def for_group(self, prompt_id: str) -> list[int]:
        index, attempt = int(prompt_id[1:]), self.attempts[prompt_id]
        self.attempts[prompt_id] += 1
        if attempt == 0:
            while index >= len(self._z):  # blocks are drawn in order, whatever asks first
                self._z = np.vstack([self._z, self._rng.standard_normal((self.CHUNK, 1 + self.s.group_size))])
            z_prompt, z_samples = self._z[index, 0], self._z[index, 1:]
        else:  # a requeued prompt: same difficulty, fresh samples
            z_prompt = self._z[index, 0]
            z_samples = np.random.default_rng([self.s.seed, index, attempt]).standard_normal(self.s.group_size)
        s = self.s
        lengths = np.exp(math.log(s.median_len) + s.prompt_sigma * z_prompt + s.sample_sigma * z_samples)
        return [max(1, min(int(x), s.max_len)) for x in lengths]


class Fleet:
    """Decode slots with continuous batching. Time advances between events only.

    `iteration` counts decode iterations (fractional: training may end mid-iteration);
    a sequence started at iteration i0 with length L finishes at iteration i0 + L.
    """

    def __init__(self, setting: Setting) -> None:
        self.a, self.b = 1.0, setting.per_seq_cost
        self.time = 0.0
        self.iteration = 0.0
        self.running: dict[int, list] = {}  # traj_id -> [start iteration, length, tokens reported]
        self.finishes: list[tuple[float, int]] = []  # heap of (finish iteration, traj_id)

    def start(self, traj_id: int, length: int) -> None:
        self.running[traj_id] = [self.iteration, length, 0]
        heapq.heappush(self.finishes, (self.iteration + length, traj_id))

    def cancel(self, traj_ids: list[int]) -> None:
        for traj_id in traj_ids:
            del self.running[traj_id]  # its heap entry is skipped when it surfaces

    def _cost(self) -> float:
        return self.a + self.b * len(self.running)

    def _top(self) -> tuple[float, int] | None:
        while self.finishes and self.finishes[0][1] not in self.running:
            heapq.heappop(self.finishes)
        return self.finishes[0] if self.finishes else None

    def next_finish_time(self) -> float:
        top = self._top()
        return math.inf if top is None else self.time + (top[0] - self.iteration) * self._cost()

    def advance_to(self, t: float) -> None:
        """Decode (or idle, if nothing runs) until time t, which is before the next finish."""
        if self.running:
            self.iteration += (t - self.time) / self._cost()
        self.time = t

    def idle(self, duration: float) -> None:
        """Let time pass with decoding paused (the trainer has the GPUs)."""
        self.time += duration

    def advance_to_next_finish(self) -> list[tuple[int, int, int]]:
        """Jump to the next finish; returns (traj_id, length, tokens not yet reported) of
        every sequence finishing then, and frees their slots."""
        self.time = self.next_finish_time()
        self.iteration = self._top()[0]
        done = []
        while (top := self._top()) is not None and top[0] <= self.iteration:
            heapq.heappop(self.finishes)
            _, length, reported = self.running.pop(top[1])
            done.append((top[1], length, length - reported))
        return done

    def report(self, scheduler: RolloutScheduler, version: int) -> None:
        """Tell the scheduler the tokens every running sequence decoded since last time."""
        for traj_id, seq in self.running.items():
            decoded = min(int(self.iteration - seq[0] + 1e-9), seq[1])
            if decoded > seq[2]:
                n = decoded - seq[2]
                scheduler.on_tokens(traj_id, [0] * n, [0.0] * n, version)
                seq[2] = decoded


@dataclass
class StepStats:
    tokens: int
    rollout: float  # from the step's start to ready()
    trained_at: float  # when its training ended
    staleness: Counter
    mean_len: float


def simulate(scheduler: RolloutScheduler, setting: Setting, steps: int, overlap: bool) -> list[StepStats]:
    """Drive `scheduler` on the simulated fleet for `steps` training steps."""
    fleet, lengths, prompts = Fleet(setting), ResponseLengths(setting), Prompts()
    engine_version = 0  # weights the fleet decodes with
    training_until: float | None = None  # overlap mode: the trainer is busy until then
    opened, ready_since = 0.0, None
    stats: list[StepStats] = []
    started_groups: dict[int, list[int]] = {}
    while len(stats) < steps:
        for traj in scheduler.admit(prompts):
            if traj.group_id not in started_groups:
                started_groups[traj.group_id] = lengths.for_group(traj.prompt_id)
            fleet.start(traj.traj_id, started_groups[traj.group_id][traj.sample_index])
        if scheduler.ready():
            ready_since = fleet.time if ready_since is None else ready_since
            if training_until is None:
                fleet.report(scheduler, engine_version)
                batch = scheduler.take_batch()
                fleet.cancel(batch.cancelled)
                train_time = setting.train_cost * batch.num_tokens
                rollout = ready_since - opened
                if overlap:
                    training_until, opened = fleet.time + train_time, fleet.time
                else:
                    fleet.idle(train_time)
                    engine_version, opened = scheduler.version, fleet.time
                stats.append(_step_stats(batch, rollout, fleet.time + (train_time if overlap else 0.0)))
                ready_since = None
                for group in batch.groups:
                    started_groups.pop(group[0].group_id, None)
                continue
        next_finish = fleet.next_finish_time()
        if training_until is not None and training_until <= next_finish:
            fleet.advance_to(training_until)
            fleet.report(scheduler, engine_version)  # tokens so far came from the old weights
            engine_version, training_until = scheduler.version, None
            continue
        if next_finish == math.inf:
            raise RuntimeError("simulation stalled: nothing decoding, nothing training, step not ready")
        for traj_id, length, unreported in fleet.advance_to_next_finish():
            if unreported:
                scheduler.on_tokens(traj_id, [0] * unreported, [0.0] * unreported, engine_version)
            scheduler.on_finished(traj_id, "length" if length >= setting.max_len else "eos")
    return stats


def _step_stats(batch, rollout: float, trained_at: float) -> StepStats:
    staleness: Counter = Counter()
    for traj in batch.trajectories:
        versions = traj.versions  # non-decreasing: count each run by bisection, not token by token
        i = 0
        while i < len(versions):
            j = bisect.bisect_right(versions, versions[i], lo=i)
            staleness[batch.version - versions[i]] += j - i
            i = j
    n = len(batch.trajectories)
    return StepStats(batch.num_tokens, rollout, trained_at, staleness, batch.num_tokens / max(n, 1))


@dataclass
class Summary:
    name: str
    rollout: float
    e2e: float
    tokens: float
    tokens_cv: float
    mean_len: float
    staleness: dict[int, float]
    dropped: float  # share of started responses dropped
    wasted: float  # share of decoded tokens dropped
    train_share: float
    tokens_per_step: list[int]


def summarise(name: str, stats: list[StepStats], counters: dict, warmup: int, setting: Setting) -> Summary:
    window = stats[warmup:]
    tokens = np.array([s.tokens for s in window], dtype=float)
    e2e = (window[-1].trained_at - stats[warmup - 1].trained_at) / len(window)
    staleness = sum((s.staleness for s in window), Counter())
    total = sum(staleness.values())
    decoded = counters["tokens_trained"] + counters["tokens_dropped"]
    return Summary(
        name=name,
        rollout=float(np.mean([s.rollout for s in window])),
        e2e=e2e,
        tokens=float(tokens.mean()),
        tokens_cv=float(tokens.std() / tokens.mean()),
        mean_len=float(np.mean([s.mean_len for s in window])),
        staleness={k: v / total for k, v in sorted(staleness.items())},
        dropped=counters["trajectories_dropped"] / max(counters["trajectories_started"], 1),
        wasted=counters["tokens_dropped"] / max(decoded, 1),
        train_share=setting.train_cost * float(tokens.mean()) / e2e,
        tokens_per_step=[s.tokens for s in stats],
    )


def run_sync(setting: Setting, steps: int, warmup: int) -> Summary:
    s = SyncScheduler(SyncConfig(setting.group_size, setting.prompts_per_step))
    return summarise("sync", simulate(s, setting, steps, overlap=False), s.counters(), warmup, setting)


def run_c3po(setting: Setting, steps: int, warmup: int, sigma: int, phi: int, overlap: bool) -> Summary:
    config = C3POConfig(setting.group_size, setting.slots, phi, sigma)
    s = C3POScheduler(config)
    name = f"c3po++ sigma={sigma}" + (" overlap" if overlap else "")
    return summarise(name, simulate(s, setting, steps, overlap), s.counters(), warmup, setting)


def table(rows: list[tuple[Summary, float]], sync: Summary) -> str:
    head = (
        f"{'schedule':<24}{'Phi/Phi0':>9}{'rollout':>10}{'e2e':>10}{'x roll':>8}{'x e2e':>7}{'x tok/t':>8}"
        f"{'tok/step':>10}{'cv':>7}{'len':>7}{'drop%':>7}{'waste%':>7}{'stale':>7}{'max':>5}"
    )
    lines = [head, "-" * len(head)]
    for summary, phi_scale in rows:
        stale_mean = sum(k * v for k, v in summary.staleness.items())
        throughput = (summary.tokens / summary.e2e) / (sync.tokens / sync.e2e)
        lines.append(
            f"{summary.name:<24}{phi_scale:>9.2f}{summary.rollout:>10.0f}{summary.e2e:>10.0f}"
            f"{sync.rollout / summary.rollout:>8.2f}{sync.e2e / summary.e2e:>7.2f}{throughput:>8.2f}"
            f"{summary.tokens:>10.0f}{summary.tokens_cv:>7.3f}{summary.mean_len:>7.0f}"
            f"{100 * summary.dropped:>7.2f}{100 * summary.wasted:>7.2f}{stale_mean:>7.2f}{max(summary.staleness):>5}"
        )
    return "\n".join(lines)


def plot(
    path: Path, sync: Summary, headline: Summary, overlap: Summary, sweep: dict, sigmas, phi_scales, warmup: int
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot written (pip install matplotlib)")
        return False
    fig, ((ax_time, ax_stale), (ax_tokens, ax_sweep)) = plt.subplots(2, 2, figsize=(13, 8.5))
    runs = [sync, headline, overlap]
    x = np.arange(len(runs))
    ax_time.bar(x - 0.2, [r.rollout for r in runs], 0.4, label="rollout phase")
    ax_time.bar(x + 0.2, [r.e2e for r in runs], 0.4, label="end to end")
    ax_time.set_xticks(x, [r.name for r in runs], fontsize=8)
    ax_time.set_ylabel("time per step (lone-sequence decode iterations)")
    ax_time.legend()
    for r, shift in ((headline, -0.2), (overlap, 0.2)):
        ks = sorted(r.staleness)
        ax_stale.bar(np.array(ks) + shift, [r.staleness[k] for k in ks], 0.4, label=r.name)
    ax_stale.set_xlabel("staleness of trained tokens (policy versions behind; sync: all 0)")
    ax_stale.set_ylabel("share of trained tokens")
    ax_stale.legend(fontsize=8)
    for r in runs[:2]:
        label = f"{r.name} (cv {r.tokens_cv:.3f})"
        ax_tokens.plot(range(len(r.tokens_per_step)), r.tokens_per_step, marker=".", label=label)
    ax_tokens.axvspan(-0.5, warmup - 0.5, color="grey", alpha=0.15, label="warm-up (not measured)")
    ax_tokens.set_xlabel("training step")
    ax_tokens.set_ylabel("response tokens trained")
    ax_tokens.legend(fontsize=8)
    for scale in phi_scales:
        gains = [_throughput(sweep[(sg, scale)], sync) for sg in sigmas]
        ax_sweep.plot(sigmas, gains, marker="o", label=f"Phi = {scale:g} Phi0")
    ax_sweep.set_xlabel("retention limit sigma")
    ax_sweep.set_ylabel("end-to-end trained tokens per time, vs sync")
    ax_sweep.axhline(1.0, color="grey", lw=0.5)
    ax_sweep.legend(fontsize=8)
    fig.suptitle("C3PO++ vs synchronous rollouts (timing simulation; learning is not simulated)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _throughput(run: Summary, sync: Summary) -> float:
    return (run.tokens / run.e2e) / (sync.tokens / sync.e2e)


def default_sigma(setting: Setting) -> int:
    """Smallest sigma that lets a maximum-length response finish at the steady decode pace.

    A slot decodes about Phi0 / N = mean_len tokens per step, so a response of max_len
    tokens lives through about max_len / mean_len step ends. A smaller sigma drops exactly
    the longest responses, a bias the report would not accept.
    """
    return math.ceil(setting.max_len / setting.expected_len())


def sensitivity(base: Setting, steps: int, warmup: int, default: tuple[Summary, Summary] | None) -> list[str]:
    """Speedups when the decode cost or the length tail change (sigma re-derived each time)."""
    lines = [f"{'variant':<44}{'mean/max':>9}{'sigma':>6}{'x roll':>8}{'x e2e':>7}{'x tok/t':>8}"]
    variants = [
        ("default", base),
        ("full batch costs 1.5x a lone sequence", dataclasses.replace(base, full_batch_extra=0.5)),
        ("full batch costs 3x a lone sequence", dataclasses.replace(base, full_batch_extra=2.0)),
        ("heavier tail: median length / 2", dataclasses.replace(base, median_len=base.median_len / 2)),
        ("lighter tail: median length x 2", dataclasses.replace(base, median_len=base.median_len * 2)),
        ("trainer 2x slower", dataclasses.replace(base, train_speed=base.train_speed / 2)),
    ]
    for name, setting in variants:
        sigma, phi = default_sigma(setting), round(setting.slots * setting.expected_len())
        if setting == base and default is not None:  # the main run already measured it
            sync, c3po = default
        else:
            sync = run_sync(setting, steps, warmup)
            c3po = run_c3po(setting, steps, warmup, sigma, phi, overlap=False)
        lines.append(
            f"{name:<44}{setting.expected_len() / setting.max_len:>9.2f}{sigma:>6}"
            f"{sync.rollout / c3po.rollout:>8.2f}{sync.e2e / c3po.e2e:>7.2f}{_throughput(c3po, sync):>8.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/c3po.png"), help="PNG plot path")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=6, help="steps left out of the measurements")
    parser.add_argument("--sigma", type=int, default=None, help="headline retention limit (default: derived)")
    parser.add_argument("--full-batch-extra", type=float, default=Setting.full_batch_extra, help="x, see Setting")
    parser.add_argument("--train-speed", type=float, default=Setting.train_speed, help="see Setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the sensitivity table")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        parser.error("need 0 < --warmup < --steps")
    began = time.perf_counter()
    # The pools hold millions of token ids in lists; the cyclic GC would rescan them on every
    # collection (half the run time) while the simulation creates no reference cycles.
    gc.disable()
    setting = Setting(full_batch_extra=args.full_batch_extra, train_speed=args.train_speed, seed=args.seed)
    mean_len = setting.expected_len()
    phi0 = round(setting.slots * mean_len)
    sigma = default_sigma(setting) if args.sigma is None else args.sigma
    print(
        f"setting: {setting.prompts_per_step} prompts x G={setting.group_size} = {setting.slots} slots; "
        f"lengths lognormal, median {setting.median_len:.0f}, capped at {setting.max_len} "
        f"(mean {mean_len:.0f} = {mean_len / setting.max_len:.2f} of max); full-batch iteration = "
        f"{1 + setting.full_batch_extra:g}x a lone one; trainer {setting.train_speed:g}x the full fleet's "
        f"token rate; Phi0 = {phi0} tokens (expected synchronous step); sigma = {sigma}; "
        f"{args.steps} steps per run, first {args.warmup} not measured"
    )
    sync = run_sync(setting, args.steps, args.warmup)
    sigmas, phi_scales = sorted({0, 1, 2, 4, 8, sigma}), (0.5, 1.0, 2.0)
    sweep = {
        (sg, scale): run_c3po(setting, args.steps, args.warmup, sg, round(scale * phi0), overlap=False)
        for scale in phi_scales
        for sg in sigmas
    }
    headline = sweep[(sigma, 1.0)]
    overlap = run_c3po(setting, args.steps, args.warmup, sigma, phi0, overlap=True)
    rows = [(sync, 1.0), (headline, 1.0), (overlap, 1.0)]
    rows += [(sweep[k], k[1]) for k in sorted(sweep, key=lambda k: (k[1], k[0])) if k != (sigma, 1.0)]
    print(
        "times in lone-sequence decode iterations. x roll / x e2e: synchronous time per step over this row's;\n"
        "x tok/t: end-to-end trained tokens per unit time over the synchronous; cv: std/mean of tokens per\n"
        "step; len: mean trained response length; drop%: responses dropped at the retention limit; waste%:\n"
        "decoded tokens thrown away with them; stale/max: mean/largest versions a trained token is behind"
    )
    print(table(rows, sync))
    for run in (headline, overlap):
        print(f"staleness shares, {run.name}: " + ", ".join(f"{k}: {v:.3f}" for k, v in run.staleness.items()))
    print(f"training takes {100 * sync.train_share:.0f}% of a synchronous step")
    if not args.no_sensitivity:
        print("sensitivity (C3PO++ without overlap, Phi = Phi0, sigma derived per row):")
        measured = (sync, headline) if args.sigma is None else None
        print("\n".join(sensitivity(setting, args.steps, args.warmup, measured)))
    wrote = plot(args.out, sync, headline, overlap, sweep, sigmas, phi_scales, args.warmup)
    if wrote:
        print(f"plot: {args.out}")
    result = {
        "rollout_speedup": round(sync.rollout / headline.rollout, 3),
        "e2e_speedup": round(sync.e2e / headline.e2e, 3),
        "e2e_speedup_overlap": round(sync.e2e / overlap.e2e, 3),
        "throughput_speedup": round(_throughput(headline, sync), 3),
        "sigma": sigma,
        "phi": phi0,
        "tokens_per_step_sync": round(sync.tokens),
        "tokens_per_step_c3po": round(headline.tokens),
        "tokens_cv_sync": round(sync.tokens_cv, 4),
        "tokens_cv_c3po": round(headline.tokens_cv, 4),
        "dropped_responses": round(headline.dropped, 4),
        "mean_staleness": round(sum(k * v for k, v in headline.staleness.items()), 3),
        "max_staleness": max(headline.staleness),
        "sync_train_share": round(sync.train_share, 3),
        "setting": dataclasses.asdict(setting),
        "plot": str(args.out) if wrote else None,
        "seconds": round(time.perf_counter() - began, 1),
        "note": "timing simulation only: learning and rewards are not simulated",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
