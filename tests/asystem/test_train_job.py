"""`asystem train` end to end, killed with SIGKILL in the middle and resumed.

A real job in a real process tree (controller, rollout worker, trainer rank, reward worker)
on the tiny recipe (random 2-layer Llama, torch engine). After the kill and `--resume`:
every step 1..N was trained exactly once, no trajectory and no prompt was trained twice,
and every prompt the job took from the data is trained or still pending: nothing lost,
nothing duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from asystem.metrics import read_jsonl
from ring.tasks import make_task_source

# Enough that the job still runs when it is killed (after step 5 or later): a tiny step takes about
# a second, and with 6 the poll sometimes saw the job done.
STEPS = 16
# The job is killed between a checkpoint and the next one, after a step past it: with a
# checkpoint every 2 steps that window was one step (under a second), and a 0.5 s poll
# once missed it in every step of the run, which then ended.
CHECKPOINT_EVERY = 4
ROOT = Path(__file__).resolve().parents[2]


def _job(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.cli", "train", "--config", "tiny", f"run.out={out}",
           f"run.steps={STEPS}", f"run.checkpoint_every={CHECKPOINT_EVERY}", *extra]
    log = open(out.parent / f"{out.name}-{len(list(out.parent.glob('*.log')))}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def _checkpoint_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "LATEST").read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


def _trained_steps(out: Path) -> int:
    path = out / "batches.jsonl"
    return max((r["step"] for r in read_jsonl(path)), default=0) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_then_resume_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    first = _job(out)
    try:
        # Killed after a checkpoint exists and at least one more step was trained after it.
        _wait_for(lambda: _checkpoint_step(out) >= CHECKPOINT_EVERY and _trained_steps(out) > _checkpoint_step(out),
                  600, "a checkpoint and a step after it", first)
        tree = psutil.Process(first.pid).children(recursive=True)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # The job's actor processes notice their parent is gone and exit by themselves.
    _wait_for(lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
              60, "the killed job's processes to exit")
    killed_at = _trained_steps(out)
    assert killed_at < STEPS, "the job finished before it could be killed; make it longer"

    second = _job(out, "--resume")
    assert second.wait(600) == 0, (out.parent / f"{out.name}-1.log").read_text()[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"], "the second run did not resume"
    batches = read_jsonl(out / "batches.jsonl")
    assert [b["step"] for b in batches] == list(range(1, STEPS + 1)), "each step trained exactly once"
    trajectories = [tuple(t) for b in batches for t in b["trajectories"]]
    assert len({t[0] for t in trajectories}) == len(trajectories), "a trajectory was trained twice"
    prompt_steps: dict[str, set[int]] = {}
    for b in batches:
        for _, prompt_id in b["trajectories"]:
            prompt_steps.setdefault(prompt_id, set()).add(b["step"])
    assert all(len(s) == 1 for s in prompt_steps.values()), "a prompt was trained in two steps"
    metric_steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r]
    assert metric_steps == list(range(1, STEPS + 1))

    # Every prompt taken from the data is trained or still pending (none discarded here).
    source = make_task_source(json.loads((out / "config.yaml").read_text())["task"]["source"])
    taken = {source[i].item_id for i in range(summary["data_position"])}
    accounted = set(prompt_steps) | set(summary["pending_prompts"])
    assert summary["counters"]["prompts_discarded"] == 0
    assert taken == accounted, f"lost: {sorted(taken - accounted)[:5]}, unknown: {sorted(accounted - taken)[:5]}"
