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


def fast_bf16() -> bool:
    """Whether bf16 matmuls are fast here: on CUDA, or on a CPU with AVX512-BF16 or AMX.

    Without them (AVX2 CPUs such as AMD Zen 3) oneDNN has no bf16 kernel and vLLM-CPU falls
    back to a path about 4.5x slower than fp32 (measured: 19 against 85 tok/s on SmolLM2)."""
    if on_gpu():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_dtype(requested: str) -> str:
    """The rollout engines' dtype: `requested`, or for "auto" bfloat16 where it is fast
    (see `fast_bf16`) and float32 elsewhere."""
    if requested != "auto":
        return requested
    return "bfloat16" if fast_bf16() else "float32"
