"""The trainer's checkpoint on disk: a transformers model directory plus optimizer state.

    <path>/
        config.json, tokenizer files, ...   copied from the base model (config rewritten)
        model.safetensors                   fp32 weights (sharded with an index when large)
        trainer/optimizer.safetensors       AdamW state, one tensor per "<param>/<key>"
        trainer/optimizer_groups.json       the optimizer's param groups
        trainer/state.json                  version, optimizer steps, world size, config

transformers and vLLM load the directory as a model. The trainer's own files live in a
subdirectory because vLLM loads every top-level *.safetensors file of an unsharded model
as weights. Nothing is pickled: tensors are safetensors, the rest JSON. `write` builds the directory in a temporary sibling and
renames it into place, so a reader sees the old checkpoint or the new one, never a part.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

TRAINER_DIR = "trainer"
TRAINER_STATE = f"{TRAINER_DIR}/state.json"
OPTIMIZER_TENSORS = f"{TRAINER_DIR}/optimizer.safetensors"
OPTIMIZER_GROUPS = f"{TRAINER_DIR}/optimizer_groups.json"
# Files of the base model directory that a checkpoint writes itself instead of copying.
_OWN_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", "config.json")


def write(path: Path, base_model: Path, model_config: dict, weights: Mapping[str, torch.Tensor],
          optimizer: dict, state: dict) -> None:
    """Write a checkpoint directory at `path` atomically (replacing an older one).

    `optimizer` is a full optimizer state dict keyed by parameter name (as
    `get_optimizer_state_dict(..., full_state_dict=True)` gives); `state` is JSON data.
    """
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        for item in Path(base_model).iterdir():
            if item.is_file() and not item.name.endswith(_OWN_FILES):
                shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        save_torch_state_dict(dict(weights), tmp)
        (tmp / TRAINER_DIR).mkdir()
        tensors, groups = _flatten_optimizer(optimizer)
        save_file(tensors, tmp / OPTIMIZER_TENSORS)
        (tmp / OPTIMIZER_GROUPS).write_text(json.dumps(groups))
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))

    _write_atomically(Path(path), fill)


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(state, weights, optimizer state dict) of the checkpoint at `path`.

    Raises FileNotFoundError if `path` is not a trainer checkpoint.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{path} is not a trainer checkpoint (no {TRAINER_STATE})")
    state = json.loads((path / TRAINER_STATE).read_text())
    optimizer = _unflatten_optimizer(load_file(path / OPTIMIZER_TENSORS),
                                     json.loads((path / OPTIMIZER_GROUPS).read_text()))
    return state, read_weights(path), optimizer


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers safetensors directory (one file or sharded)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(path / name))
    return weights


def _write_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    """Have `fill` write a directory in a temporary sibling, then rename it to `path`.

    An older directory at `path` is moved aside first and deleted after; in between,
    `path` is briefly absent but never partial. Files and the rename are fsynced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        for item in tmp.rglob("*"):
            if item.is_file():
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(optimizer: dict) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Per-parameter state as flat tensors ("param/key"); param groups as JSON data."""
    tensors = {f"{param}/{key}": value.contiguous() for param, state in optimizer["state"].items()
               for key, value in state.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in optimizer["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        param, _, key = flat.rpartition("/")
        state.setdefault(param, {})[key] = value
    # JSON has no tuples; AdamW's betas are one.
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in groups]
    return {"state": state, "param_groups": groups}
