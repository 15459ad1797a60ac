"""msgpack codec with out-of-band zero-copy buffers for tensors and arrays. Never pickles.

Wire layout of one encoded object (the tail of a ZeroMQ multipart message)::

    [body, *buffers]

``body`` is one msgpack document. Plain values are msgpack's own types: nil, bool, int,
float, str, bin, array, map. Tensors and arrays are msgpack ext types; the ext code says the
kind and the payload is itself a small msgpack array::

    ext 1 (torch.Tensor), ext 2 (numpy.ndarray):   [dtype, shape, data]

- ``dtype``: a name from the allow-list of that kind, e.g. ``"bfloat16"`` or ``"int64"``.
- ``shape``: a list of at most 64 non-negative ints; ``[]`` for a 0-d tensor.
- ``data``: either an int, the index of the out-of-band buffer that holds the elements, or
  bin, the elements inline. Buffers are numbered from 0 in the order their tensors occur in
  the body, and each is used exactly once.

The elements are C-contiguous, in the host's byte order (asystem runs on little-endian hosts
only), and ``prod(shape) * itemsize`` equals the data's length. Ext codes 0-31 belong to the
codec (only 1 and 2 are in use); 32-127 are for higher layers, see :func:`register_ext`.
msgpack itself decodes its predefined timestamp extension (code -1) into
``msgpack.Timestamp`` before the codec sees it; no asystem encoder produces one.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["CodecError", "Limits", "decode", "encode", "frames_nbytes", "register_ext"]

_EXT_TENSOR = 1
_EXT_NDARRAY = 2
_RESERVED_CODES = range(0, 32)
_MAX_NDIM = 64  # numpy's limit; torch allows more, but tensors that deep do not travel

# torch is imported only when a tensor is decoded (or was imported by someone else, when
# one is encoded: no object is a tensor before torch is loaded). Importing it takes most of
# a second or more, and a process that only passes plain values never needs it.
_TORCH_DTYPE_NAMES = (
    "bool",
    "uint8", "uint16", "uint32", "uint64",
    "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64",
    "float8_e4m3fn", "float8_e5m2",
    "complex64", "complex128",
)  # fmt: skip


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in _TORCH_DTYPE_NAMES}


@functools.cache
def _torch_names() -> dict[torch.dtype, str]:
    return {dtype: name for name, dtype in _torch_dtypes().items()}

_NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool",
        "uint8", "uint16", "uint32", "uint64",
        "int8", "int16", "int32", "int64",
        "float16", "float32", "float64",
        "complex64", "complex128",
    )
}  # fmt: skip

# Types msgpack packs by itself, subclasses included: it never asks `default` about them,
# so an ext registered for one of them would silently never apply.
_NATIVE_TYPES = (type(None), bool, int, float, str, bytes, bytearray, memoryview, list, tuple, dict)


class CodecError(ValueError):
    """The payload is malformed, uses an unknown extension, or breaks a limit."""


@dataclass(frozen=True)
class Limits:
    """How big a message :func:`decode` accepts. The limits are checked before any parsing,
    so an oversized message costs the receiver nothing beyond having received it."""

    max_frames: int = 1024
    """Out-of-band buffers per message; the body frame comes on top."""
    max_frame_bytes: int = 1 << 30
    """Bytes in any single frame, body or buffer."""
    max_message_bytes: int = 2 << 30
    """Bytes in all frames together."""
    max_body_bytes: int = 64 << 20
    """Bytes in the msgpack body frame. Inline data (small tensors, bytes, str) lives here."""


# --- extension registry ---------------------------------------------------------------


@dataclass(frozen=True)
class _Ext:
    code: int
    cls: type
    to_bytes: Callable[[Any], bytes]
    from_bytes: Callable[[bytes], Any]


_ext_by_code: dict[int, _Ext] = {}
_ext_by_type: dict[type, _Ext] = {}
_registry_lock = threading.Lock()


def register_ext(
    code: int,
    cls: type,
    to_bytes: Callable[[Any], bytes],
    from_bytes: Callable[[bytes], Any],
) -> None:
    """Let instances of ``cls`` travel as msgpack ext type ``code``.

    Encoding applies to instances of exactly ``cls`` (not its subclasses): ``to_bytes(obj)``
    must return bytes, which travel inline in the body. Decoding calls ``from_bytes(data)``;
    anything it raises becomes a :class:`CodecError`. Codes 0-31 are reserved for the codec,
    32-127 are free. Registering the same (code, cls) pair again replaces the functions;
    a code taken by another class, or a class registered under another code, raises
    ValueError, as does a class that msgpack packs natively (a tuple or dict subclass, say),
    since the ext would never apply to it. Register at import time, before encoding.
    """
    _check_ext_code(code)
    if not isinstance(cls, type) or issubclass(cls, _NATIVE_TYPES):
        raise ValueError(f"cannot register {cls!r}: msgpack packs it natively, ignoring the ext")
    with _registry_lock:
        _check_ext_free(code, cls)
        ext = _Ext(code, cls, to_bytes, from_bytes)
        _ext_by_code[code] = _ext_by_type[cls] = ext


def _check_ext_code(code: int) -> None:
    if type(code) is not int or not 0 <= code <= 127:
        raise ValueError(f"ext code must be an int in 32-127, got {code!r}")
    if code in _RESERVED_CODES:
        raise ValueError(f"ext code {code} is reserved for the codec itself; use 32-127")


def _check_ext_free(code: int, cls: type) -> None:
    taken = _ext_by_code.get(code)
    if taken is not None and taken.cls is not cls:
        raise ValueError(f"ext code {code} is already registered for {_qualname(taken.cls)}")
    other = _ext_by_type.get(cls)
    if other is not None and other.code != code:
        raise ValueError(f"{_qualname(cls)} is already registered as ext code {other.code}")


def _pack_registered(ext: _Ext, obj: Any) -> msgpack.ExtType:
    data = ext.to_bytes(obj)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        got = _qualname(type(data))
        raise TypeError(f"to_bytes for {_qualname(ext.cls)} returned {got}, not bytes")
    return msgpack.ExtType(ext.code, bytes(data))


def _unpack_registered(ext: _Ext, data: bytes) -> Any:
    try:
        return ext.from_bytes(data)
    except Exception as e:
        name = _qualname(ext.cls)
        raise CodecError(f"ext code {ext.code} ({name}): from_bytes failed: {_describe(e)}") from e


# --- encode ---------------------------------------------------------------------------


def encode(obj: Any, *, zero_copy_threshold: int = 64 * 1024) -> list:
    """Encode ``obj`` into frames ``[body, *buffers]``: body is msgpack bytes, and each
    buffer is a memoryview holding the elements of one tensor or array.

    A tensor or array whose data is ``zero_copy_threshold`` bytes or more goes out of band
    as its own buffer; smaller ones go inline in the body. An out-of-band buffer references
    the tensor's memory without copying when the tensor is on the CPU and contiguous; the
    buffer keeps that memory alive, but the caller must not modify the tensor until the
    frames are sent. Copies are made, and sent instead, for tensors that are on another
    device (moved to the CPU, synchronously), non-contiguous (made contiguous) or carry a
    lazy conjugate/negative bit (resolved). Tensors that require grad are sent detached.

    Types carried: None, bool, int in [-2**63, 2**64) (others raise OverflowError), float,
    str, bytes (bytearray and memoryview arrive as bytes), list and tuple (a tuple arrives
    as a list), dict with str or int keys (keys are not checked here: other key types that
    msgpack accepts pass through, and a key that decodes unhashable fails at the receiver),
    torch.Tensor and numpy.ndarray of the allow-listed dtypes (bool, ints, floats including
    bfloat16 and float8 for torch, complex), numpy scalars (they arrive as Python scalars),
    and classes given to :func:`register_ext`. Any other type raises TypeError naming it.
    A tensor or array whose dtype, layout or device cannot travel (object arrays, sparse or
    meta tensors) raises :class:`CodecError`.
    """
    # Most messages hold only msgpack's own types: try a reused packer without `default`
    # first (0.6 us against 3 us for a small call); anything else raises, and takes the
    # full path below. One packer per thread: a Packer must not be shared between threads.
    packer = getattr(_plain, "packer", None)
    if packer is None:
        packer = _plain.packer = msgpack.Packer(use_bin_type=True, datetime=False)
    try:
        return [packer.pack(obj)]
    except (TypeError, ValueError, OverflowError):
        packer.reset()  # what it packed before failing stays in its buffer otherwise
    encoder = _Encoder(zero_copy_threshold)
    body = msgpack.packb(obj, default=encoder.default, use_bin_type=True, datetime=False)
    return [body, *encoder.buffers]


_plain = threading.local()


class _Encoder:
    """The state of one :func:`encode` call: the out-of-band buffers collected so far, in
    the order msgpack meets their tensors, which is the order :class:`_Decoder` meets them."""

    def __init__(self, zero_copy_threshold: int):
        self.threshold = zero_copy_threshold
        self.buffers: list[memoryview] = []

    def default(self, obj: Any) -> Any:
        """msgpack's hook for every value it cannot pack itself."""
        ext = _ext_by_type.get(type(obj))
        if ext is not None:
            return _pack_registered(ext, obj)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._array_ext(_EXT_TENSOR, *_tensor_bytes(obj))
        if isinstance(obj, np.ndarray):
            return self._array_ext(_EXT_NDARRAY, *_ndarray_bytes(obj))
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            return obj.item()
        if isinstance(obj, int):  # msgpack asks about ints it cannot fit, too
            raise OverflowError(f"int {obj} is out of msgpack's range [-2**63, 2**64 - 1]")
        raise TypeError(f"cannot encode an object of type {_qualname(type(obj))}")

    def _array_ext(self, code: int, dtype: str, shape: list[int], data: memoryview) -> Any:
        if data.nbytes >= self.threshold:
            self.buffers.append(data)
            where: int | bytes = len(self.buffers) - 1
        else:
            where = data.tobytes()
        return msgpack.ExtType(code, msgpack.packb([dtype, shape, where], use_bin_type=True))


def _tensor_bytes(t: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """The dtype name, shape and a flat byte view of ``t``'s elements (a copy only when
    ``t`` is not already a contiguous, resolved CPU tensor)."""
    import torch

    name = _torch_names().get(t.dtype)
    if name is None:
        supported = ", ".join(_TORCH_DTYPE_NAMES)
        raise CodecError(f"cannot encode a tensor of dtype {t.dtype}; supported: {supported}")
    if t.layout != torch.strided:
        raise CodecError(f"cannot encode a tensor of layout {t.layout}; send .to_dense()")
    if t.device.type == "meta":
        raise CodecError("cannot encode a tensor on the meta device: it has no data")
    if t.dim() > _MAX_NDIM:
        raise CodecError(f"cannot encode a tensor of {t.dim()} dimensions; at most {_MAX_NDIM}")
    # contiguous() before cpu(): on an accelerator the gather is cheaper than on the host.
    t = t.detach().resolve_conj().resolve_neg().contiguous().cpu()
    # reshape(-1) first: view(dtype) refuses 0-d tensors. Both are views here, no copy,
    # and the memoryview keeps the tensor's storage alive through numpy's base reference.
    flat = t.reshape(-1).view(torch.uint8)
    return name, list(t.shape), memoryview(flat.numpy())


def _ndarray_bytes(a: np.ndarray) -> tuple[str, list[int], memoryview]:
    """Like :func:`_tensor_bytes`, for numpy arrays; non-native byte order is converted."""
    if np.ma.isMaskedArray(a):
        raise TypeError("cannot encode a numpy masked array: it would lose its mask")
    dtype = _NUMPY_DTYPES.get(a.dtype.name)
    if dtype is None:
        raise CodecError(_bad_numpy_dtype(a.dtype))
    a = np.asarray(a, dtype=dtype, order="C")  # no copy unless strided or byte-swapped
    return a.dtype.name, list(a.shape), memoryview(a.reshape(-1).view(np.uint8))


def _bad_numpy_dtype(dtype: np.dtype) -> str:
    if dtype.kind == "O":
        return (
            "cannot encode a numpy array of dtype object: its elements are Python objects, "
            "which only pickle could carry; convert it to a numeric dtype or to a list"
        )
    return f"cannot encode a numpy array of dtype {dtype}; supported: {', '.join(_NUMPY_DTYPES)}"


# --- decode ---------------------------------------------------------------------------


def decode(frames: Sequence[Any], *, limits: Limits = Limits()) -> Any:
    """Decode frames made by :func:`encode` back into the object.

    ``frames`` is a sequence of buffer-protocol objects: bytes, bytearray, memoryview or
    ``zmq.Frame.buffer``. The limits are checked first (frame count, each frame's size,
    the total, the body's size); a breach raises :class:`CodecError` naming the limit and
    the actual size.

    Tensors and arrays of out-of-band frames are views over the frame memory, not copies,
    and keep that memory alive after the caller drops its frames. Such memory is often
    read-only (bytes, ZeroMQ frames): numpy marks those arrays read-only, but torch has no
    read-only tensors, so writing into such a tensor is undefined behaviour; ``clone()``
    first. Inline tensors and arrays are fresh, writable copies. Tuples arrive as lists.

    Anything malformed raises :class:`CodecError` and nothing else: bad msgpack, an
    unknown ext code, a bad dtype, a shape/size mismatch, a buffer index out of range or
    out of order, unused trailing frames, truncated data.
    """
    if len(frames) == 1 and type(frames[0]) is bytes and len(frames[0]) <= limits.max_body_bytes:
        # The common small message: no buffers, so nothing to view, check or count (the
        # shared decoder stays unchanged: any reference to a buffer is out of range).
        return _unpack_body(frames[0], _NO_BUFFERS.ext_hook)
    views = _frame_views(frames, limits)
    decoder = _Decoder(views[1:])
    obj = _unpack_body(views[0], decoder.ext_hook)
    decoder.check_all_used()
    return obj


def frames_nbytes(frames: Sequence[Any]) -> int:
    """The total size in bytes of ``frames`` (any buffer-protocol objects)."""
    return sum(memoryview(f).nbytes for f in frames)


def _frame_views(frames: Sequence[Any], limits: Limits) -> list[memoryview]:
    """Flat byte views of ``frames``, after checking them against ``limits``."""
    if len(frames) == 0:
        raise CodecError("no frames: a message needs at least the body frame")
    _check_limit(f"{len(frames) - 1} buffer frames", len(frames) - 1, "max_frames", limits)
    views = [_byte_view(i, f) for i, f in enumerate(frames)]
    for i, view in enumerate(views):
        _check_limit(f"frame {i} has {view.nbytes} bytes", view.nbytes, "max_frame_bytes", limits)
    total = sum(view.nbytes for view in views)
    _check_limit(f"message has {total} bytes", total, "max_message_bytes", limits)
    _check_limit(f"body has {views[0].nbytes} bytes", views[0].nbytes, "max_body_bytes", limits)
    return views


def _check_limit(what: str, actual: int, limit: str, limits: Limits) -> None:
    if actual > getattr(limits, limit):
        raise CodecError(f"{what}, over Limits.{limit}={getattr(limits, limit)}")


def _byte_view(index: int, frame: Any) -> memoryview:
    try:
        return memoryview(frame).cast("B")
    except TypeError as e:  # no buffer protocol, or a non-contiguous view
        kind = _qualname(type(frame))
        raise CodecError(f"frame {index} ({kind}) is not a contiguous buffer: {e}") from e


def _unpack_body(body: memoryview | bytes, ext_hook: Callable[[int, bytes], Any]) -> Any:
    n = len(body) if type(body) is bytes else body.nbytes
    try:
        # Every declared length is bounded by the body, so a forged header cannot make
        # msgpack preallocate more than the body's size. Int keys need strict_map_key=False.
        return msgpack.unpackb(
            body, raw=False, strict_map_key=False, ext_hook=ext_hook,
            max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n,
        )  # fmt: skip
    except CodecError:
        raise
    except Exception as e:  # msgpack's ValueErrors, unhashable keys, bad UTF-8, deep nesting
        raise CodecError(f"malformed body: {_describe(e)}") from e


class _Decoder:
    """The state of one :func:`decode` call: the buffers, and how many were used so far."""

    def __init__(self, buffers: list[memoryview]):
        self.buffers = buffers
        self.used = 0

    def ext_hook(self, code: int, payload: bytes) -> Any:
        """msgpack's hook for every ext value in the body."""
        if code == _EXT_TENSOR:
            dtypes = _torch_dtypes()
            dtype, shape, data = self._array_parts(dtypes, "tensor", payload)
            return _tensor_from(dtypes[dtype], shape, data)
        if code == _EXT_NDARRAY:
            dtype, shape, data = self._array_parts(_NUMPY_DTYPES, "ndarray", payload)
            return _ndarray_from(_NUMPY_DTYPES[dtype], shape, data)
        ext = _ext_by_code.get(code)
        if ext is None:
            raise CodecError(f"unknown ext code {code}")
        return _unpack_registered(ext, payload)

    def check_all_used(self) -> None:
        unused = len(self.buffers) - self.used
        if unused:
            raise CodecError(f"{unused} unused trailing frame(s): the body uses {self.used}")

    def _array_parts(self, dtypes: dict, kind: str, payload: bytes) -> tuple[str, list, Any]:
        """The validated (dtype name, shape, data) of a tensor or ndarray ext payload; data
        is the out-of-band buffer or the inline bytes, of exactly the size the shape needs."""
        dtype, shape, where = _unpack_header(kind, payload)
        if type(dtype) is not str or dtype not in dtypes:
            raise CodecError(f"{kind} has unsupported dtype {_short(dtype)}")
        _check_shape(kind, shape)
        data = self._data(kind, where)
        expected = math.prod(shape) * dtypes[dtype].itemsize
        if len(data) != expected:
            need = f"{kind} of shape {_short(shape)} and dtype {dtype} needs {expected} bytes"
            raise CodecError(f"{need}, its data has {len(data)}")
        return dtype, shape, data

    def _data(self, kind: str, where: Any) -> memoryview | bytes:
        if type(where) is bytes:
            return where
        if type(where) is not int:
            got = _qualname(type(where))
            raise CodecError(f"{kind} data must be a buffer index or bytes, got {got}")
        if not 0 <= where < len(self.buffers):
            n = len(self.buffers)
            raise CodecError(f"{kind} refers to buffer {where}, out of range: the message has {n}")
        if where != self.used:
            # Buffers are numbered in body order, so this also catches a buffer used twice.
            raise CodecError(f"{kind} refers to buffer {where}, expected {self.used}")
        self.used += 1
        return self.buffers[where]


_NO_BUFFERS = _Decoder([])


def _unpack_header(kind: str, payload: bytes) -> list:
    n = len(payload)
    try:
        header = msgpack.unpackb(
            payload, raw=False, ext_hook=_no_nested_ext,
            max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n,
        )  # fmt: skip
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"malformed {kind} header: {_describe(e)}") from e
    if type(header) is not list or len(header) != 3:
        raise CodecError(f"{kind} header must be [dtype, shape, data], got {_short(header)}")
    return header


def _no_nested_ext(code: int, payload: bytes) -> Any:
    raise CodecError(f"ext code {code} inside a tensor header")


def _check_shape(kind: str, shape: Any) -> None:
    if type(shape) is not list or len(shape) > _MAX_NDIM:
        raise CodecError(f"{kind} shape must be a list of <= {_MAX_NDIM} ints, got {_short(shape)}")
    for dim in shape:
        # type() rather than isinstance: msgpack's true/false must not pass as 1/0.
        if type(dim) is not int or not 0 <= dim < 1 << 63:
            raise CodecError(f"{kind} shape must hold ints in [0, 2**63), got {_short(shape)}")


def _tensor_from(dtype: torch.dtype, shape: list[int], data: memoryview | bytes) -> torch.Tensor:
    """A tensor over ``data`` when it is an out-of-band buffer, else over a copy of it."""
    import torch

    try:
        if len(data) == 0:  # torch.frombuffer refuses empty buffers
            return torch.empty(shape, dtype=dtype)
        if isinstance(data, bytes):
            return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
        return _frombuffer(data, dtype).reshape(shape)
    except (RuntimeError, ValueError, OverflowError) as e:  # e.g. zero-size, strides overflow
        raise CodecError(f"cannot build a tensor of shape {_short(shape)}: {e}") from e


def _frombuffer(view: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """torch.frombuffer over ``view``, which holds a reference to the exporting object for
    as long as the tensor's storage lives (tested), so the frame outlives the caller's list."""
    import torch

    if not view.readonly:
        return torch.frombuffer(view, dtype=dtype)
    # torch warns that it cannot mark the tensor read-only; decode's docstring says so
    # instead. catch_warnings swaps process-wide state, so another thread changing warning
    # filters at this instant could lose its change; torch warns once per process anyway.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return torch.frombuffer(view, dtype=dtype)


def _ndarray_from(dtype: np.dtype, shape: list[int], data: memoryview | bytes) -> np.ndarray:
    """An array over ``data`` when it is an out-of-band buffer, else over a copy of it."""
    source = bytearray(data) if isinstance(data, bytes) else data
    try:
        return np.frombuffer(source, dtype=dtype).reshape(shape)
    except ValueError as e:  # e.g. a zero-size shape whose other dims overflow
        raise CodecError(f"cannot build an array of shape {_short(shape)}: {e}") from e


# --- helpers --------------------------------------------------------------------------


def _qualname(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", repr(cls))
    return name if module in (None, "builtins") else f"{module}.{name}"


def _describe(error: Exception) -> str:
    # str(), not repr(): msgpack's ExtraData repr holds the whole object decoded so far.
    return f"{type(error).__name__}: {_truncate(str(error))}"


def _short(value: Any) -> str:
    return _truncate(repr(value))


def _truncate(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
