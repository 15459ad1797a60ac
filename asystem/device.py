"""Where tensors live: one variable decides, everything else follows.

`ASYSTEM_DEVICE` = "cpu" | "cuda" | "cuda:N" sets the device; unset, CUDA is used when
available. The weight-broadcast backend follows the device (NCCL on CUDA, gloo on CPU), so
the CPU tests run the same code paths as a GPU job.
"""

from __future__ import annotations

import os

import torch


def device() -> torch.device:
    """The device of this process's engine or trainer rank."""
    name = os.environ.get("ASYSTEM_DEVICE", "").strip()
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"ASYSTEM_DEVICE={name} but CUDA is not available in this process")
    return dev


def collective_backend(dev: torch.device | None = None) -> str:
    """"nccl" for CUDA tensors, "gloo" otherwise."""
    return "nccl" if (dev or device()).type == "cuda" else "gloo"


def on_gpu() -> bool:
    return device().type == "cuda"
