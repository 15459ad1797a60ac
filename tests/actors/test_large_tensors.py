"""A 256 MiB tensor crosses processes intact, in both directions."""

from __future__ import annotations

import time

import pytest
import torch

from .sample_actors import Tensors, sha256

MiB = 1 << 20
SIZE = 256 * MiB


def random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


@pytest.mark.slow  # about 11 s on 2 cores: generating, encrypting and hashing 512 MiB
async def test_a_256_mib_tensor_arrives_intact_both_ways(system):
    remote = await system.spawn(Tensors, where="process")
    # float32, 2-d: dtype and shape travel too, not only bytes.
    sent = random_bytes(SIZE, seed=1).view(torch.float32).reshape(8192, -1)
    started = time.monotonic()
    shape, dtype, digest = await remote.ask("digest", sent, timeout=60)
    assert (shape, dtype) == ([8192, SIZE // 4 // 8192], "torch.float32")
    assert digest == sha256(sent), "the tensor arrived corrupted"

    received = await remote.ask("make", SIZE, 2, timeout=60)
    assert received.dtype == torch.uint8 and received.shape == (SIZE,)
    assert sha256(received) == sha256(random_bytes(SIZE, seed=2))
    assert time.monotonic() - started < 40


async def test_a_tensor_view_travels_as_its_own_elements(system):
    """A non-contiguous view sends the elements it shows, not its base's storage."""
    remote = await system.spawn(Tensors, where="process")
    base = torch.arange(64 * MiB // 8, dtype=torch.int64).reshape(1024, -1)
    view = base[::2, 1::3]
    back = await remote.ask("echo", view, timeout=30)
    assert back.shape == view.shape and torch.equal(back, view)
