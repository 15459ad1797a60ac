"""Job checkpoints on disk: a directory per step, made visible only when complete.

    <out>/checkpoints/step-000012/
        trainer/           written by the trainer ranks (model as a transformers directory,
                           optimiser, learning-rate schedule, RNG)
        controller.msgpack the controller's state: scheduler pools with their unfinished
                           partial trajectories, data position, counters, RNG
    <out>/checkpoints/LATEST   the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp-<pid>` and renamed into place, then LATEST is
replaced (write to a temporary file, fsync, rename): a crash at any point leaves the
previous checkpoint as the one `latest()` returns, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import msgpack

CONTROLLER_STATE = "controller.msgpack"
TRAINER_DIR = "trainer"


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def begin(out: Path, step: int) -> Path:
    """A fresh temporary directory to write the checkpoint of `step` into."""
    tmp = checkpoints_dir(out) / f"step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """The controller's state as msgpack (plain data only: no pickle, ever)."""
    path = Path(directory) / CONTROLLER_STATE
    with open(path, "wb") as f:
        f.write(msgpack.packb(state, use_bin_type=True))
        f.flush()
        os.fsync(f.fileno())


def read_state(directory: Path) -> dict[str, Any]:
    with open(Path(directory) / CONTROLLER_STATE, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)


def commit(tmp: Path, step: int, keep: int = 2) -> Path:
    """Make the checkpoint in `tmp` the newest one; keep the `keep` newest, delete older."""
    root = tmp.parent
    final = root / f"step-{step:06d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer = root / f"LATEST.tmp-{os.getpid()}"
    with open(pointer, "w") as f:
        f.write(final.name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / "LATEST")
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and ".tmp" not in p.name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp-*"):  # left by a run that was killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in `out`, or None."""
    root = checkpoints_dir(out)
    try:
        name = (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if (path / CONTROLLER_STATE).exists() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
