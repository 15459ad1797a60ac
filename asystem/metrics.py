"""Where a run's numbers go: a JSONL file, TensorBoard, a live terminal view and a PNG.

`MetricsLog.write(step, metrics)` appends one JSON object per step to `metrics.jsonl`
(flushed at once, so a killed run keeps every step it finished) and the scalar values to
TensorBoard under the same names. `plot(path)` draws the curves a user looks at first.
`LiveView` is the terminal display of `asystem train`: one table, redrawn in place.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What the live view and the plot show, in order: (metric key, label, format).
HEADLINE = [
    ("step", "step", "{:.0f}"),
    ("reward/mean", "reward", "{:.3f}"),
    ("eval/accuracy", "held-out acc", "{:.3f}"),
    ("rollout/tokens_per_s", "tokens/s", "{:.0f}"),
    ("train/masked_frac", "masked", "{:.4f}"),
    ("staleness/mean", "staleness", "{:.2f}"),
    ("time/step", "step s", "{:.1f}"),
    ("time/generation", "gen s", "{:.1f}"),
    ("time/reward", "reward s", "{:.1f}"),
    ("time/training", "train s", "{:.1f}"),
    ("time/sync", "sync s", "{:.1f}"),
    ("time/idle", "idle s", "{:.1f}"),
]

PLOTS = [
    ("reward/mean", "mean sampled reward"),
    ("eval/accuracy", "held-out greedy accuracy"),
    ("train/masked_frac", "IcePop masked fraction"),
    ("train/mismatch_abs_mean", "mean |log p_train - log p_infer|"),
    ("train/grad_norm", "gradient norm"),
    ("time/step", "seconds per step"),
]


class MetricsLog:
    """Per-step metrics to `<out>/metrics.jsonl` and TensorBoard (`<out>/tensorboard`), and
    what each step trained on (trajectory and prompt ids) to `<out>/batches.jsonl`."""

    def __init__(self, out: Path, tensorboard: bool = True) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self.batches_path = out / "batches.jsonl"
        self._file = open(self.path, "a")
        self._batches = open(self.batches_path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError as exc:  # tensorboard is a dependency; say so if it is missing
                log.warning("TensorBoard disabled (%s); metrics still go to %s", exc, self.path)

    def write(self, step: int, metrics: dict[str, Any], batch: list | None = None) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if batch is not None:
            self._batches.write(json.dumps({"step": step, "trajectories": batch}) + "\n")
            self._batches.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._batches.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(out: Path, step: int) -> None:
    """Forget the steps after `step` (a resumed run redoes them): rewrite both JSONL files."""
    for name in ("metrics.jsonl", "batches.jsonl"):
        path = Path(out) / name
        if path.exists():
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))
            tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw the PLOTS curves (those present) against the step into one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training host
    import matplotlib.pyplot as plt

    present = [(k, label) for k, label in PLOTS if any(k in r for r in records)]
    cols = 3
    rows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class LiveView:
    """A table of the last steps, redrawn in place (rich); plain log lines when not a TTY."""

    def __init__(self, title: str, rows: int = 12) -> None:
        from rich.console import Console

        self.title = title
        self.rows: list[dict[str, Any]] = []
        self.keep = rows
        self.status = ""
        self.console = Console()
        self._live = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self._table(), console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, metrics: dict[str, Any]) -> None:
        self.rows = (self.rows + [metrics])[-self.keep:]
        if self._live is not None:
            self._live.update(self._table())
        else:
            self.console.print(self._line(metrics), highlight=False)

    def note(self, status: str) -> None:
        self.status = status
        if self._live is not None:
            self._live.update(self._table())
        else:
            self.console.print(status, highlight=False)

    def _table(self):
        from rich.table import Table

        table = Table(title=self.title, caption=self.status, expand=False)
        for _, label, _ in HEADLINE:
            table.add_column(label, justify="right")
        for row in self.rows:
            table.add_row(*(_fmt(row.get(key), fmt) for key, _, fmt in HEADLINE))
        return table

    @staticmethod
    def _line(metrics: dict[str, Any]) -> str:
        return "  ".join(f"{label} {_fmt(metrics.get(key), fmt)}" for key, label, fmt in HEADLINE
                         if metrics.get(key) is not None)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return ""
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)
