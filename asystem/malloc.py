"""glibc malloc settings for trainer processes: keep freed memory for the next step.

By default glibc serves a large allocation (above a threshold that grows to 32 MiB) with
fresh pages from mmap, returns it to the kernel on free, and trims the top of its heap.
A training step on the host allocates and frees the same activations and gradients every
step, so every step page-faults them in again: with SmolLM2-135M on one core, 0.5-1 M
minor faults and about 2 s of system time in a 9-10 s step. Serving every allocation from
the heap and never trimming it removes those faults after the second step, and the steps
take 7.4-7.7 s instead (measured with the trainer alone, fp32, 16 sequences; the rollout
engine gained nothing, so it keeps glibc's defaults). The price: the process keeps its
peak heap, which a trainer reaches every step anyway.

The settings reach a child process through the GLIBC_TUNABLES environment variable, read
once when the process starts; where the launcher's environment sets GLIBC_TUNABLES
already, that choice stands. Other C libraries ignore the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

TUNABLES = ("glibc.malloc.mmap_threshold=2147483647"  # every allocation from the heap...
            ":glibc.malloc.trim_threshold=17179869184")  # ...which is never given back


def trainer_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment variables for a trainer process: the malloc settings, unless `environ`
    sets GLIBC_TUNABLES already."""
    return {} if "GLIBC_TUNABLES" in environ else {"GLIBC_TUNABLES": TUNABLES}
