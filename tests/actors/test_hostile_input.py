"""Bad input from the wire: whatever a peer sends, it gets a clear error reply or is dropped
with a log line and a counter, nothing it sends crashes or wedges the system, and the actor
keeps answering everyone correctly.

The hostile peer is a raw pyzmq DEALER. Unless a test says otherwise it holds the cluster's
CURVE client keys: it is a member that sends garbage, the worst case the runtime must
survive; a peer without the keys never gets past the handshake."""

from __future__ import annotations

import asyncio
import gc
import random
import time

import msgpack
import psutil
import pytest
import zmq
import zmq.asyncio

from actors import ActorRef, ActorSystem, BadRequestError
from transport import codec
from transport.auth import configure_client, derive_keys
from transport.codec import Limits
from transport.envelope import PROTOCOL_VERSION, Envelope, Kind, pack_header, unpack_header

from .conftest import eventually, new_system
from .sample_actors import Echo, Recorder

LIMITS = Limits(max_frames=8, max_frame_bytes=64 * 1024, max_message_bytes=128 * 1024,
                max_body_bytes=32 * 1024)
ECHO = "echo-under-attack"


class Hostile:
    """A raw DEALER speaking the wire protocol by hand."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, secret: bytes | None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if secret is not None:
            configure_client(self.sock, derive_keys(secret))
        self.sock.connect(address)
        self.corr = 1000

    def next_corr(self) -> int:
        self.corr += 1
        return self.corr

    async def send(self, frames: list) -> None:
        await self.sock.send_multipart(frames)

    async def recv(self, timeout: float = 5.0) -> tuple[Envelope, object]:
        """The next answer: its envelope and its decoded body."""
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        return unpack_header(frames[0]), codec.decode(frames[1:])

    async def silence(self, wait: float = 0.3) -> None:
        """Nothing comes back within ``wait`` seconds."""
        assert await self.sock.poll(int(wait * 1000)) == 0, "an answer came back"

    async def error(self, frames: list, corr: int) -> dict:
        """Send ``frames``; the answer must be an ERROR for ``corr``: return its body."""
        await self.send(frames)
        env, body = await self.recv()
        assert (env.kind, env.corr) == (Kind.ERROR, corr), (env, body)
        assert set(body) == {"code", "type", "message", "traceback"}, body
        return body

    def call(self, method: str = "echo", args=("hi",), kwargs=None, *, target: str = ECHO,
             corr: int | None = None, kind: Kind = Kind.CALL,
             deadline_ms: int = 5000) -> tuple[list, int]:
        """A well-formed message, and its corr."""
        corr = self.next_corr() if corr is None else corr
        header = pack_header(Envelope(kind, corr, "hostile", target, method, deadline_ms))
        return [header, *codec.encode([list(args), kwargs or {}])], corr

    async def ask_echo(self, value) -> None:
        """The actor answers a normal call on this very connection."""
        frames, corr = self.call("echo", [value])
        await self.send(frames)
        env, body = await self.recv()
        assert (env.kind, env.corr, body) == (Kind.REPLY, corr, value)


@pytest.fixture
async def host():
    """A system with small limits hosting an Echo and a Recorder actor."""
    system = await new_system(limits=LIMITS).start()
    await system.spawn(Echo, actor_id=ECHO)
    await system.spawn(Recorder, actor_id="recorder")
    try:
        yield system
    finally:
        async with asyncio.timeout(30):
            await system.shutdown()


@pytest.fixture
async def member(host):
    """Another system of the cluster (same secret): how a well-behaved caller sees the host."""
    system = await new_system(secret=host.secret).start()
    try:
        yield system
    finally:
        async with asyncio.timeout(30):
            await system.shutdown()


@pytest.fixture
async def hostile(host):
    ctx = zmq.asyncio.Context()
    peer = Hostile(ctx, host.address, host.secret)
    try:
        yield peer
    finally:
        peer.sock.close()
        ctx.term()


async def still_serves(host: ActorSystem, member: ActorSystem, hostile: Hostile | None = None):
    """The echo actor answers a remote member (and the hostile connection) correctly."""
    ref = ActorRef(host.address, ECHO, None, member)
    assert await ref.ask("echo", {"still": [1, 2, 3]}, timeout=5) == {"still": [1, 2, 3]}
    if hostile is not None:
        await hostile.ask_echo("still here")


def rejected(host) -> int:
    return host.stats().get("transport.rejected", 0)


# -- garbage that cannot be answered: dropped, logged, counted ----------------------------


@pytest.mark.parametrize("frames", [
    [random.Random(1).randbytes(64)],
    [random.Random(2).randbytes(7), random.Random(3).randbytes(300)],
    [b""],
    [b"", b""],
    [b"\x98"],  # a header cut after its first byte
    [msgpack.packb([PROTOCOL_VERSION, 1, -1, "a", ECHO, "echo", 0, 0])],  # corr unreadable
    [msgpack.packb({"kind": "call"})],
], ids=["random", "random-2-frames", "empty-frame", "empty-frames", "truncated-header",
        "negative-corr", "map-header"])
async def test_unanswerable_garbage_is_dropped_logged_and_counted(host, member, hostile, frames,
                                                                   caplog):
    before = rejected(host)
    await hostile.send(frames)
    await eventually(lambda: rejected(host) == before + 1, 5, what="the drop was counted")
    await hostile.silence(0.1)
    assert "rejected message" in caplog.text
    await still_serves(host, member, hostile)


# -- bad headers whose corr is readable: an error reply -----------------------------------


@pytest.mark.parametrize("version", [0, 2, 255, "1", None, True, 1.0])
async def test_a_wrong_protocol_version_gets_an_error_naming_the_versions(host, member, hostile,
                                                                          version):
    corr = hostile.next_corr()
    header = msgpack.packb([version, int(Kind.CALL), corr, "h", ECHO, "echo", 0, 0])
    body = await hostile.error([header, *codec.encode([["x"], {}])], corr)
    assert body["code"] == "bad_request"
    assert "protocol version" in body["message"] and str(PROTOCOL_VERSION) in body["message"]
    await still_serves(host, member, hostile)


@pytest.mark.parametrize("field, value, words", [
    (1, 99, "unknown message kind"),
    (3, 17, "sender must be a string"),
    (4, b"bytes", "target must be a string"),
    (5, "m" * 1000, "method has 1000 characters"),
    (6, -5, "deadline_ms"),
    (7, 1 << 40, "credit"),
])
async def test_a_bad_header_field_gets_an_error_naming_it(host, member, hostile, field, value,
                                                          words):
    corr = hostile.next_corr()
    fields = [PROTOCOL_VERSION, int(Kind.CALL), corr, "h", ECHO, "echo", 0, 0]
    fields[field] = value
    header = msgpack.packb(fields, use_bin_type=True)
    body = await hostile.error([header, *codec.encode([["x"], {}])], corr)
    assert body["code"] == "bad_request" and words in body["message"], body
    await still_serves(host, member, hostile)


@pytest.mark.parametrize("kind", [Kind.REPLY, Kind.ERROR, Kind.STREAM_ITEM, Kind.STREAM_END,
                                  Kind.HEARTBEAT_ACK])
async def test_answer_kinds_sent_to_the_system_are_dropped_and_counted(host, member, hostile,
                                                                       kind):
    before = rejected(host)
    frames, _ = hostile.call(kind=kind)
    await hostile.send(frames)
    await eventually(lambda: rejected(host) == before + 1, 5, what="the drop was counted")
    await hostile.silence(0.1)
    await still_serves(host, member, hostile)


async def test_cancels_and_credits_for_unknown_calls_are_ignored(host, member, hostile):
    for kind in (Kind.CANCEL, Kind.CREDIT):
        for corr in (0, 1, 123456789):
            await hostile.send([pack_header(Envelope(kind, corr, "h", ECHO, credit=5))])
    await hostile.send([pack_header(Envelope(Kind.HEARTBEAT, 1))])
    await hostile.silence(0.2)
    await still_serves(host, member, hostile)


# -- well-formed headers, wrong content: an error reply per case --------------------------


async def test_an_unknown_actor_is_named_in_the_error(host, member, hostile):
    frames, corr = hostile.call(target="nobody-here")
    body = await hostile.error(frames, corr)
    assert body["code"] == "unknown_actor" and "nobody-here" in body["message"]
    assert host.stats()["refused.unknown_actor"] == 1
    await still_serves(host, member, hostile)


@pytest.mark.parametrize("method", ["no_such_method", "", "_private", "__init__", "on_stop",
                                    "stop", "spawn", "count", "__terminated__"])
async def test_an_unknown_or_private_method_is_refused(host, member, hostile, method):
    frames, corr = hostile.call(method)
    body = await hostile.error(frames, corr)
    assert body["code"] == "unknown_method", body
    assert repr(method) in body["message"] and "echo" in body["message"]
    await still_serves(host, member, hostile)


async def test_streaming_a_coroutine_method_is_refused(host, member, hostile):
    frames, corr = hostile.call("echo", kind=Kind.STREAM)
    body = await hostile.error(frames, corr)
    assert body["code"] == "unknown_method" and "async-generator" in body["message"]
    await still_serves(host, member, hostile)


@pytest.mark.parametrize("args, kwargs", [
    ([], {}), (["a", "b"], {}), ([], {"nope": 1}), (["a"], {"value": 2}), ([], {"self": 1}),
])
async def test_wrong_arguments_are_refused_without_running_the_method(host, member, hostile,
                                                                       args, kwargs):
    frames, corr = hostile.call("echo", args, kwargs)
    body = await hostile.error(frames, corr)
    assert body["code"] == "bad_request" and "wrong arguments for Echo.echo" in body["message"]
    await still_serves(host, member, hostile)


def _tensor_ext(payload) -> bytes:
    return msgpack.packb([[msgpack.ExtType(1, msgpack.packb(payload))], {}])


@pytest.mark.parametrize("body_frames, words", [
    ([b"\xc1"], "undecodable"),  # a reserved msgpack byte
    ([b"\x92\x91"], "undecodable"),  # truncated
    ([msgpack.packb([["x"], {}]) + b"\x00"], "undecodable"),  # trailing data
    ([], "undecodable"),  # header only, no body
    ([msgpack.packb(["x"])], "must be [args list"),
    ([msgpack.packb({"args": []})], "must be [args list"),
    ([msgpack.packb([["x"], {1: 2}])], "must be [args list"),
    ([msgpack.packb([["x"], []])], "must be [args list"),
    ([msgpack.packb(None)], "must be [args list"),
    ([_tensor_ext(["float99", [2], b"\x00" * 8])], "undecodable"),  # unknown dtype
    ([_tensor_ext(["float32", [4], b"\x00" * 8])], "undecodable"),  # size mismatch
    ([_tensor_ext(["float32", [2], 0])], "undecodable"),  # buffer 0 is missing
    ([msgpack.packb([[msgpack.ExtType(99, b"?")], {}])], "undecodable"),  # unknown ext
    ([msgpack.packb([[msgpack.ExtType(32, b"\x93\x01\x02\x03")], {}])], "undecodable"),  # ref
    ([msgpack.packb([["x"], {}]), b"unused buffer"], "undecodable"),
])
async def test_undecodable_arguments_are_refused(host, member, hostile, body_frames, words):
    corr = hostile.next_corr()
    header = pack_header(Envelope(Kind.CALL, corr, "h", ECHO, "echo", 5000))
    body = await hostile.error([header, *body_frames], corr)
    assert body["code"] == "bad_request" and words in body["message"], body
    await still_serves(host, member, hostile)


@pytest.mark.parametrize("frames, words", [
    ([b"x" * (LIMITS.max_frame_bytes + 1)], str(LIMITS.max_frame_bytes)),
    ([b"x" * (10 * LIMITS.max_frame_bytes)], str(LIMITS.max_frame_bytes)),
    ([b"\xc0"] + [b"x" * 60_000] * 3, str(LIMITS.max_message_bytes)),
    ([b"\xc0"] * (LIMITS.max_frames + 3), str(LIMITS.max_frames + 1)),
    ([msgpack.packb([["x" * 40_000], {}])], "max_body_bytes"),
], ids=["frame", "frame-10x", "message", "frame-count", "body"])
async def test_oversized_messages_get_an_error_naming_the_limit(host, member, hostile, frames,
                                                                words):
    corr = hostile.next_corr()
    header = pack_header(Envelope(Kind.CALL, corr, "h", ECHO, "echo", 5000))
    body = await hostile.error([header, *frames], corr)
    assert body["code"] == "bad_request" and words in body["message"], body
    await still_serves(host, member, hostile)


async def test_a_remote_caller_with_an_oversized_argument_gets_a_bad_request(host, member):
    ref = ActorRef(host.address, ECHO, None, member)
    with pytest.raises(BadRequestError, match=str(LIMITS.max_frame_bytes)):
        await ref.ask("echo", b"x" * (4 * LIMITS.max_frame_bytes), timeout=5)
    await still_serves(host, member)


async def test_bad_tells_are_dropped_logged_and_counted(host, member, hostile, caplog):
    for frames in (hostile.call("no_such_method", kind=Kind.TELL)[0],
                   hostile.call("echo", ["a", "b"], kind=Kind.TELL)[0],
                   hostile.call("echo", target="nobody", kind=Kind.TELL)[0],
                   [pack_header(Envelope(Kind.TELL, 0, "h", ECHO, "echo")), b"\xc1"],
                   hostile.call("__terminated__", ["not a ref", 5, None], kind=Kind.TELL)[0]):
        await hostile.send(frames)
    await hostile.silence(0.3)
    stats = host.stats()
    assert stats.get("tell_errors", 0) == 2, stats
    assert stats.get("refused.unknown_actor", 0) == 1, stats
    assert stats.get("refused.bad_request", 0) == 2, stats
    assert "tell no_such_method failed" in caplog.text
    await still_serves(host, member, hostile)


# -- unauthenticated peers ----------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, b"not-the-cluster-secret!!"], ids=["no-curve",
                                                                            "wrong-secret"])
async def test_an_unauthenticated_peer_never_reaches_an_actor(host, member, secret):
    ctx = zmq.asyncio.Context()
    intruder = Hostile(ctx, host.address, secret)
    try:
        for _ in range(5):
            frames, _ = intruder.call("record", ["intruder"], target="recorder", kind=Kind.TELL)
            await intruder.send(frames)
            frames, _ = intruder.call("echo", ["intruder"])
            await intruder.send(frames)
        await eventually(lambda: host.stats().get("transport.handshake_failures", 0) > 0, 5,
                         what="the failed handshake was counted")
        await intruder.silence(0.3)
        recorder = ActorRef(host.address, "recorder", None, member)
        assert await recorder.ask("history", timeout=5) == []
        assert not any(k.startswith("refused") for k in host.stats())
        await still_serves(host, member)
    finally:
        intruder.sock.close()
        ctx.term()


# -- fuzzing ------------------------------------------------------------------------------


def mutations(rng: random.Random, hostile: Hostile):
    """Endless random and mutated messages, most of them derived from valid CALLs."""
    values = [None, 1, -1, (1 << 64) - 1, 1.5, "x", b"y", [], {}, [1, [2, [3]]], {"k": "v"}]
    # Not "sleep": a member may legitimately keep the actor busy for as long as it asks.
    methods = ["echo", "pid", "count", "boom", "nope", "", "__init__"]

    def valid():
        frames, _ = hostile.call(rng.choice(methods), [rng.choice(values)],
                                 kind=rng.choice([Kind.CALL, Kind.CALL, Kind.TELL]))
        return [bytearray(f) for f in frames]

    def flip(frames):
        frame = rng.choice(frames)
        for _ in range(rng.randint(1, 4)):
            if frame:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        return frames

    def truncate(frames):
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
        return frames

    def extra_frames(frames):
        return frames + [bytearray(rng.randbytes(rng.randint(0, 40)))
                         for _ in range(rng.randint(1, 12))]

    def missing_frames(frames):
        return frames[:rng.randrange(len(frames))] or [bytearray()]

    def header_fields(frames):
        fields = [PROTOCOL_VERSION, int(Kind.CALL), hostile.next_corr(), "h", ECHO,
                  rng.choice(methods), 5000, 0]
        i = rng.randrange(8)
        fields[i] = rng.choice([*values, rng.randint(0, 20), PROTOCOL_VERSION + 1,
                                rng.randint(-(1 << 63), (1 << 64) - 1)])
        if rng.random() < 0.5:
            fields[1] = rng.randint(0, 15)  # random kinds: answers, cancels, credits...
        frames[0] = bytearray(msgpack.packb(fields, use_bin_type=True))
        return frames

    def random_message(_):
        return [bytearray(rng.randbytes(rng.randint(0, 64))) for _ in range(rng.randint(1, 4))]

    moves = [flip, truncate, extra_frames, missing_frames, header_fields, random_message]
    while True:
        frames = valid()
        for move in rng.sample(moves, rng.randint(1, 2)):
            frames = move(frames)
        yield [bytes(f) for f in frames]


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


async def fuzz(host, hostile, rng, n: int) -> int:
    """Send ``n`` fuzzed messages, reading answers as they come; returns how many came."""
    answers = 0
    source = mutations(rng, hostile)
    for i in range(n):
        await hostile.send(next(source))
        while await hostile.sock.poll(0):
            await hostile.sock.recv_multipart()
            answers += 1
        if i % 200 == 0:
            await asyncio.sleep(0)
    deadline = time.monotonic() + 10
    while await hostile.sock.poll(300) and time.monotonic() < deadline:
        await hostile.sock.recv_multipart()
        answers += 1
    return answers


@pytest.mark.timeout(90)
async def test_fuzzed_frames_leave_the_actor_answering_and_memory_bounded(host, member,
                                                                          hostile, caplog):
    caplog.set_level("CRITICAL")  # thousands of warnings: counted, not captured
    rng = random.Random(20240531)
    await fuzz(host, hostile, rng, 2000)  # warm up: caches, log records, pools
    await still_serves(host, member, hostile)
    before = rss()
    started = time.monotonic()
    answers = await fuzz(host, hostile, rng, 10_000)
    elapsed = time.monotonic() - started
    await still_serves(host, member, hostile)
    grown = rss() - before
    stats = host.stats()
    assert answers > 1000, "hardly anything was answered: the fuzzer is not exercising errors"
    assert stats.get("transport.rejected", 0) > 1000, stats
    assert stats.get("transport.handler_errors", 0) == 0, stats
    assert grown < 40 << 20, f"RSS grew by {grown >> 20} MiB over 10,000 fuzzed messages"
    assert not host._active, f"requests left behind: {list(host._active)[:5]}"
    assert elapsed < 60


async def test_a_caller_that_reads_nothing_stalls_the_actor_at_most_until_its_deadline(
        host, member, hostile):
    """Its answers fill its queue (the high-water mark); each waits for room at most until
    that caller's deadline, then is dropped and counted, and the actor serves the others."""
    await hostile.ask_echo("connected")
    give_up = time.monotonic() + 20
    while not host.stats().get("transport.reply_queue_full"):
        assert time.monotonic() < give_up, f"no answer was dropped: {host.stats()}"
        frames, _ = hostile.call("echo", ["x" * 30_000], deadline_ms=1000)
        try:
            await hostile.sock.send_multipart(frames, zmq.NOBLOCK)
            await asyncio.sleep(0)
        except zmq.Again:  # the system holds it back while its actor catches up
            await asyncio.sleep(0.01)
    started = time.monotonic()
    await still_serves(host, member)
    assert time.monotonic() - started < 4.0


async def test_an_answer_over_the_callers_limits_fails_the_ask_at_once(host):
    """The caller's own limits apply to what comes back: a too-big answer is a clear error
    naming the limit, not a timeout, and the caller's next asks work."""
    small = Limits(max_frame_bytes=16 * 1024)
    async with new_system(secret=host.secret, limits=small) as caller:
        ref = ActorRef(host.address, ECHO, None, caller)
        assert await ref.ask("echo", "small", timeout=5) == "small"
        started = time.monotonic()
        with pytest.raises(BadRequestError, match=str(small.max_frame_bytes)):
            await ref.ask("echo", [b"x" * 10_000] * 3, timeout=10)  # 30 KB each way
        assert time.monotonic() - started < 2
        assert await ref.ask("echo", "again", timeout=5) == "again"
