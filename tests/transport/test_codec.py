"""The codec: what goes in comes out, big tensors travel without copies, and no input makes
decode raise anything but CodecError."""

import gc
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.codec import CodecError, Limits, decode, encode, frames_nbytes, register_ext

ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 64 * 1024

TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32,
    torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.complex128,
]  # fmt: skip
NUMPY_DTYPES = [
    np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]  # fmt: skip


def wire(frames):
    """What the receiver gets: fresh, read-only copies, as ZeroMQ delivers them."""
    return [bytes(f) for f in frames]


def round_trip(obj, **kwargs):
    return decode(wire(encode(obj, **kwargs)))


def random_tensor(dtype, numel, seed=0):
    """Random bits of ``dtype`` (NaNs included for floats); bools are 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def random_array(dtype, numel):
    if dtype is np.bool_:
        return random_tensor(torch.bool, numel).numpy()
    return random_tensor(torch.uint8, numel * np.dtype(dtype).itemsize).numpy().view(dtype)


def same_tensor(a, b):
    """Same dtype, shape and bits (bitwise, so NaNs and float8 compare too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return torch.equal(bits(a), bits(b))


def address(buffer):
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


# --- round trips ----------------------------------------------------------------------


def test_plain_data_round_trips_and_tuples_arrive_as_lists():
    obj = {
        "none": None, "bools": [True, False], "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
        "float": -1.5e300, "str": "héllo ✓", "bytes": b"\x00\xff", "empty": [{}, [], "", b""],
        7: {"nested": [[1, [2, [3]]]]}, "tuple": (1, ("a", 2.0)),
    }  # fmt: skip
    frames = encode(obj)
    assert len(frames) == 1
    expected = {**obj, "tuple": [1, ["a", 2.0]]}
    assert decode(wire(frames)) == expected


@pytest.mark.parametrize("numel", [7, THRESHOLD + 1], ids=["inline", "out-of-band"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_tensor_round_trip(dtype, numel):
    t = random_tensor(dtype, numel).reshape(1, numel)
    frames = encode(t)
    assert len(frames) == (2 if t.nbytes >= THRESHOLD else 1)
    assert same_tensor(decode(wire(frames)), t)


@pytest.mark.parametrize("numel", [7, THRESHOLD + 1], ids=["inline", "out-of-band"])
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_ndarray_round_trip(dtype, numel):
    a = random_array(dtype, numel).reshape(numel, 1)
    frames = encode(a)
    assert len(frames) == (2 if a.nbytes >= THRESHOLD else 1)
    b = decode(wire(frames))
    assert type(b) is np.ndarray and b.dtype == a.dtype and b.shape == a.shape
    assert b.tobytes() == a.tobytes()


@pytest.mark.parametrize("threshold", [0, THRESHOLD], ids=["all-out-of-band", "default"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor(2.5, dtype=torch.bfloat16),
        lambda: torch.empty(0),
        lambda: torch.empty(3, 0, 2, dtype=torch.int16),
        lambda: torch.arange(200_000.0).reshape(400, 500).t(),
        lambda: torch.arange(100.0)[::3],
        lambda: torch.ones(1).expand(50_000),
        lambda: torch.randn(2, 3, 40, 40).to(memory_format=torch.channels_last),
        lambda: torch.arange(10.0)[4:],
        lambda: torch.tensor([1 + 2j, 3 - 4j]).conj(),
    ],
    ids=["0-d", "empty", "empty-3d", "transposed", "strided", "expanded", "channels-last",
         "offset", "conj"],
)  # fmt: skip
def test_odd_tensors_round_trip(make, threshold):
    t = make()
    u = round_trip(t, zero_copy_threshold=threshold)
    assert u.is_contiguous()
    assert torch.equal(u, t.resolve_conj())


def test_odd_ndarrays_round_trip():
    a = np.arange(12, dtype=">i4").reshape(3, 4)  # big-endian
    objs = [a, a.T, a[:, ::2], np.array(3.5), np.empty((0, 4), np.float32)]
    for threshold in (0, THRESHOLD):
        for x, y in zip(objs, round_trip(objs, zero_copy_threshold=threshold), strict=True):
            assert y.dtype.isnative and y.shape == x.shape
            np.testing.assert_array_equal(y, x)


def test_numpy_scalars_arrive_as_python_scalars():
    got = round_trip([np.int64(-3), np.uint8(7), np.float32(0.5), np.bool_(True), np.str_("s")])
    assert got == [-3, 7, 0.5, True, "s"]
    assert [type(v) for v in got] == [int, int, float, bool, str]


def test_tensors_requiring_grad_arrive_detached():
    p = torch.nn.Parameter(torch.randn(3, 3))
    for threshold in (0, THRESHOLD):
        u = round_trip({"w": p, "y": p * 2}, zero_copy_threshold=threshold)
        assert type(u["w"]) is torch.Tensor and not u["w"].requires_grad
        assert torch.equal(u["w"], p.detach()) and torch.equal(u["y"], (p * 2).detach())


def test_inline_results_are_writable_copies():
    t, a = round_trip([torch.zeros(4), np.zeros(4)])
    t += 1
    a += 1
    assert t.sum() == 4 and a.sum() == 4


# --- zero copy ------------------------------------------------------------------------


def test_encode_references_the_tensor_memory():
    t = torch.zeros(THRESHOLD, dtype=torch.float32)
    body, buffer = encode({"t": t})
    assert address(buffer) == t.data_ptr() and buffer.nbytes == t.nbytes
    t[0] = 1.0
    assert bytes(buffer[:4]) == np.float32(1.0).tobytes()


def test_encode_references_the_ndarray_memory():
    a = np.zeros(THRESHOLD, dtype=np.int32)
    _, buffer = encode(a)
    assert address(buffer) == a.ctypes.data
    a[0] = 7
    assert bytes(buffer[:4]) == np.int32(7).tobytes()


def test_encoded_buffer_keeps_the_tensor_alive():
    frames = encode(torch.full((THRESHOLD,), 3, dtype=torch.int32))
    gc.collect()
    torch.empty(THRESHOLD, dtype=torch.int32).fill_(-1)  # would reuse freed memory
    assert torch.equal(decode(wire(frames)), torch.full((THRESHOLD,), 3, dtype=torch.int32))


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
def test_decoded_out_of_band_data_is_a_view_of_the_frame(kind):
    x = torch.arange(THRESHOLD, dtype=torch.int64)
    body, buffer = encode(x if kind == "tensor" else x.numpy())
    received = bytearray(buffer)
    y = decode([body, memoryview(received)])
    pointer = y.data_ptr() if kind == "tensor" else y.ctypes.data
    assert pointer == address(received)
    received[:8] = (99).to_bytes(8, "little")
    assert y[0] == 99


def test_decoded_tensor_keeps_its_frame_alive():
    body, buffer = encode(torch.arange(THRESHOLD, dtype=torch.int64))
    received = bytearray(buffer)
    frames = [body, received]
    t = decode(frames)
    # torch.frombuffer holds a buffer export on the frame: it cannot be resized or freed.
    with pytest.raises(BufferError):
        received.append(0)
    del frames, received
    gc.collect()
    _ = [bytearray(buffer) for _ in range(4)]  # churn the allocator
    assert torch.equal(t, torch.arange(THRESHOLD, dtype=torch.int64))


def test_decode_of_zmq_frames():
    x = {"ids": torch.arange(50_000), "small": torch.ones(3), "meta": ["a", 1]}
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://test-codec-zmq-frames")
        b.connect("inproc://test-codec-zmq-frames")
        a.send_multipart(encode(x), copy=False)
        parts = b.recv_multipart(copy=False)
    finally:
        a.close(linger=0)
        b.close(linger=0)
    y = decode([p.buffer for p in parts])
    del parts
    gc.collect()
    assert torch.equal(y["ids"], x["ids"]) and torch.equal(y["small"], x["small"])
    assert y["meta"] == ["a", 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_arrive_on_the_cpu():
    t = torch.arange(100_000, device="cuda").reshape(1000, 100).t()
    for threshold in (0, THRESHOLD):
        u = round_trip(t, zero_copy_threshold=threshold)
        assert u.device.type == "cpu" and torch.equal(u, t.cpu())


def test_read_only_frames_raise_no_warning():
    # torch warns once per process, so only a fresh interpreter shows whether decode lets it out.
    script = textwrap.dedent("""
        import torch
        from transport.codec import decode, encode
        frames = [bytes(f) for f in encode(torch.arange(100_000))]
        assert torch.equal(decode(frames), torch.arange(100_000))
    """)
    command = [sys.executable, "-W", "error", "-c", script]
    run = subprocess.run(command, cwd=ROOT, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()


def test_256_mib_tensor_arrives_intact():
    t = torch.empty(64 << 20, dtype=torch.float32).uniform_()  # 256 MiB; about 2 s in all
    frames = encode({"weights": t, "step": 3})
    assert frames_nbytes(frames) == t.nbytes + len(frames[0])
    received = wire(frames)  # one copy, as the network makes
    del frames
    u = decode(received)["weights"]
    assert u.data_ptr() != t.data_ptr() and torch.equal(u, t)


def test_frames_nbytes_counts_every_frame():
    frames = encode([torch.zeros(THRESHOLD, dtype=torch.uint8), np.zeros(THRESHOLD, np.int16)])
    assert frames_nbytes(frames) == len(frames[0]) + THRESHOLD * 3
    assert frames_nbytes([b"ab", bytearray(3), memoryview(b"x")]) == 6


# --- encode errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj, name",
    [(object(), "object"), ({1, 2}, "set"), (1j, "complex"), (torch.float32, "torch.dtype"),
     ([{"k": Path("/")}], "Path"), (np.ma.array([1, 2], mask=[0, 1]), "masked"),
     (np.complex64(1j), "complex64")],
)  # fmt: skip
def test_encoding_an_unsupported_type_raises_type_error(obj, name):
    with pytest.raises(TypeError, match=name):
        encode(obj)


@pytest.mark.parametrize(
    "obj, message",
    [(np.array([object()]), "dtype object"), (np.array(["a"]), "dtype <U1"),
     (np.zeros(2, "datetime64[s]"), "datetime64"),
     (torch.zeros(2, dtype=torch.float8_e4m3fnuz), "float8_e4m3fnuz"),
     (torch.zeros(2).to_sparse(), "sparse"), (torch.zeros(2, device="meta"), "meta"),
     (torch.zeros([1] * 65), "65 dimensions")],
)  # fmt: skip
def test_encoding_an_unsupported_array_raises_codec_error(obj, message):
    with pytest.raises(CodecError, match=message):
        encode(obj)


# --- extensions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    x: int
    y: int

    def to_bytes(self):
        return msgpack.packb([self.x, self.y])

    @classmethod
    def from_bytes(cls, data):
        x, y = msgpack.unpackb(data)
        return cls(x, y)


class Other:
    pass


class Broken:
    pass


register_ext(100, Point, Point.to_bytes, Point.from_bytes)
register_ext(101, Broken, lambda obj: b"", lambda data: 1 / 0)


def test_registered_ext_round_trips():
    obj = {"p": Point(1, -2), "ps": [Point(3, 4), torch.ones(THRESHOLD)]}
    got = round_trip(obj)
    assert got["p"] == Point(1, -2) and got["ps"][0] == Point(3, 4)


def test_registering_again_the_same_pair_is_allowed():
    register_ext(100, Point, Point.to_bytes, Point.from_bytes)


@pytest.mark.parametrize(
    "code, cls, message",
    [(100, Other, "already registered for"), (102, Point, "already registered as ext code 100"),
     (5, Other, "reserved"), (128, Other, "32-127"), (-1, Other, "32-127"),
     (103, tuple, "natively"), (104, dict, "natively")],
)  # fmt: skip
def test_conflicting_or_invalid_registration_raises(code, cls, message):
    with pytest.raises(ValueError, match=message):
        register_ext(code, cls, bytes, bytes)


def test_from_bytes_errors_become_codec_errors():
    with pytest.raises(CodecError, match="ZeroDivisionError"):
        round_trip(Broken())


# --- bad input ------------------------------------------------------------------------


def ext(code, header):
    return msgpack.ExtType(code, msgpack.packb(header))


def body(obj):
    return msgpack.packb(obj, use_bin_type=True)


F32 = np.float32(1).tobytes() * 4
BAD_MESSAGES = {
    "empty": [],
    "never-used byte": [b"\xc1"],
    "truncated": [encode({"a": [1, 2, 3], "b": "text"})[0][:-3]],
    "truncated ext": [encode(torch.ones(3))[0][:-5]],
    "trailing bytes": [body(1) + b"\x01"],
    "bad utf-8": [b"\xa2\xff\xfe"],
    "unhashable key": [b"\x81\x90\x01"],
    "deep nesting": [b"\x91" * 5000 + b"\xc0"],
    "huge declared array": [b"\xdd\xff\xff\xff\xff"],
    "huge declared bin": [b"\xc6\xff\xff\xff\xff"],
    "reserved ext code": [body(ext(9, []))],
    "unregistered ext code": [body(ext(77, []))],
    "negative ext code": [b"\xd4\xfe\x00"],
    "bad timestamp": [b"\xd5\xff\x00\x01"],
    "header not a list": [body(ext(1, {"dtype": "float32"}))],
    "header too short": [body(ext(1, ["float32", [4]]))],
    "header not msgpack": [body(msgpack.ExtType(1, b"\xc1"))],
    "ext inside header": [body(ext(1, ["float32", [4], ext(1, [])]))],
    "unknown dtype": [body(ext(1, ["float128", [1], b"\x00" * 16]))],
    "dtype object": [body(ext(2, ["object", [1], b"\x00" * 8]))],
    "dtype not a str": [body(ext(1, [5, [1], b"\x00"]))],
    "unhashable dtype": [body(ext(1, [["float32"], [1], b"\x00"]))],
    "numpy has no bfloat16": [body(ext(2, ["bfloat16", [1], b"\x00\x00"]))],
    "negative dim": [body(ext(1, ["float32", [-4], F32]))],
    "bool dim": [body(ext(1, ["float32", [True], np.float32(1).tobytes()]))],
    "str dim": [body(ext(1, ["float32", ["4"], F32]))],
    "shape not a list": [body(ext(1, ["float32", 4, F32]))],
    "too many dims": [body(ext(1, ["uint8", [1] * 65, b"\x00"]))],
    "dim over 64 bits": [body(ext(1, ["uint8", [0, 2**64 - 1], b""]))],
    "inline size mismatch": [body(ext(1, ["float32", [5], F32]))],
    "out-of-band size mismatch": [body(ext(1, ["float32", [5], 0])), F32],
    "numpy size mismatch": [body(ext(2, ["int64", [3], 0])), F32],
    "zero-size overflow": [body(ext(2, ["uint8", [0, 2**62, 2**62], b""]))],
    "data a float": [body(ext(1, ["float32", [4], 0.0])), F32],
    "data a bool": [body(ext(1, ["float32", [4], False])), F32],
    "index out of range": [body(ext(1, ["float32", [4], 1])), F32],
    "index negative": [body(ext(1, ["float32", [4], -1])), F32],
    "no buffers": [body(ext(1, ["float32", [4], 0]))],
    "buffer used twice": [body([ext(1, ["float32", [4], i]) for i in (0, 0)]), F32, F32],
    "buffers out of order": [body([ext(1, ["float32", [4], i]) for i in (1, 0)]), F32, F32],
    "extra frame": [*encode(torch.ones(3)), b"extra"],
    "extra frame after buffers": [*encode(torch.ones(THRESHOLD)), b""],
    "frame not a buffer": [body(1), 5],
    "non-contiguous frame": [body(ext(1, ["uint8", [2], 0])), memoryview(b"abcd")[::2]],
}  # fmt: skip


@pytest.mark.parametrize("frames", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_input_raises_codec_error(frames):
    with pytest.raises(CodecError):
        decode(frames)


def test_registered_ext_with_bad_payload_raises_codec_error():
    with pytest.raises(CodecError, match="Point"):
        decode([body(msgpack.ExtType(100, b"\xc1"))])


@pytest.mark.parametrize(
    "limits, frames, message",
    [
        (Limits(max_frames=2), [b"\xc0", b"", b"", b""], r"3 buffer frames.*max_frames=2"),
        (Limits(max_frame_bytes=10), [b"\xc0", bytes(11)], r"frame 1 has 11 bytes.*frame_bytes=10"),
        (Limits(max_message_bytes=10), [b"\xc0", bytes(5), bytes(5)], r"has 11 .*message_bytes"),
        (Limits(max_body_bytes=4), [body("hello")], r"body has 6 bytes.*max_body_bytes=4"),
    ],
    ids=["frames", "frame bytes", "message bytes", "body bytes"],
)
def test_over_limit_messages_raise_codec_error_naming_limit_and_size(limits, frames, message):
    with pytest.raises(CodecError, match=message):
        decode(frames, limits=limits)


def test_limits_are_inclusive():
    frames = encode([torch.ones(4), torch.ones(4)], zero_copy_threshold=0)
    limits = Limits(
        max_frames=2, max_frame_bytes=max(map(len, frames)),
        max_message_bytes=frames_nbytes(frames), max_body_bytes=len(frames[0]),
    )  # fmt: skip
    assert len(decode(frames, limits=limits)) == 2


# --- fuzzing --------------------------------------------------------------------------

msgpack_ints = st.integers(-(2**63), 2**64 - 1)
small_tensors = st.builds(
    random_tensor, st.sampled_from(TORCH_DTYPES), st.integers(0, 12), st.integers(0, 2**16)
)
small_arrays = st.builds(
    lambda dtype, n: np.arange(n).astype(dtype), st.sampled_from(NUMPY_DTYPES), st.integers(0, 12)
)
leaves = st.one_of(
    st.none(), st.booleans(), msgpack_ints, st.floats(), st.text(max_size=8), st.binary(max_size=8),
    small_tensors, small_arrays, st.builds(Point, msgpack_ints, msgpack_ints),
)  # fmt: skip
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4) | msgpack_ints, inner, max_size=4),
    max_leaves=8,
)


@st.composite
def mutated_messages(draw):
    """A valid encoding (tensors of 16 bytes or more out of band), then a few mutations."""
    frames = [bytearray(f) for f in encode(draw(values), zero_copy_threshold=16)]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "drop", "duplicate", "swap"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op in ("flip", "truncate", "insert") and frames:
            at = draw(st.integers(0, len(frames[i])))
            if op == "flip" and at < len(frames[i]):
                frames[i][at] ^= draw(st.integers(1, 255))
            elif op == "truncate":
                del frames[i][at:]
            else:
                frames[i][at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "duplicate" and frames:
            frames.insert(i, bytearray(frames[i]))
        elif op == "swap" and len(frames) > 1:
            frames[0], frames[-1] = frames[-1], frames[0]
    return [bytes(f) for f in frames]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_messages())
def test_mutated_encodings_decode_or_raise_codec_error(frames):
    try:
        decode(frames)
    except CodecError:
        pass


@settings(max_examples=100, deadline=None)
@given(values)
def test_generated_values_round_trip(value):
    def normal(v):  # tensors and arrays compared by dtype, shape and bits
        if isinstance(v, torch.Tensor):
            bits = v.reshape(-1).view(torch.uint8).numpy().tobytes()
            return ("tensor", str(v.dtype), tuple(v.shape), bits)
        if isinstance(v, np.ndarray):
            return ("ndarray", v.dtype.str, v.shape, v.tobytes())
        if isinstance(v, (list, tuple)):
            return [normal(x) for x in v]
        if isinstance(v, dict):
            return {k: normal(x) for k, x in v.items()}
        if isinstance(v, float) and v != v:
            return "nan"
        return v

    for threshold in (0, 16, THRESHOLD):
        assert normal(round_trip(value, zero_copy_threshold=threshold)) == normal(value)


def test_torch_is_imported_only_when_a_tensor_arrives():
    """A process that passes plain values and arrays never pays for importing torch; the
    first tensor it decodes imports it."""
    frames = [bytes(f) for f in encode({"t": torch.arange(6, dtype=torch.int16).reshape(2, 3)},
                                       zero_copy_threshold=1)]
    program = textwrap.dedent(f"""
        import sys
        import numpy as np
        from transport.codec import decode, encode
        assert decode(encode([1, "a", b"b", np.ones(3)]))[:3] == [1, "a", b"b"]
        assert "torch" not in sys.modules, "encoding plain values imported torch"
        t = decode({frames!r})["t"]
        assert "torch" in sys.modules and t.tolist() == [[0, 1, 2], [3, 4, 5]], t
    """)
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
