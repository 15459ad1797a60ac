"""The endpoint: requests and answers travel in their own direction and in order; what
breaks a rule (size limits, a wrong direction, a peer without the cluster secret) never
reaches the handler, is answered or counted, and leaves the connection usable; lost peers
(killed, hung, gone) are reported promptly."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from transport import auth
from transport.codec import Limits
from transport.endpoint import (TO_CALLEE, TO_CALLER, Endpoint, Heartbeat, Incoming,
                                TransportError)
from transport.envelope import Envelope, Kind, pack_header

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"test-cluster-secret-0123456789"
FAST = Heartbeat(interval=0.2, timeout=1.0)


class Recorder:
    """A handler that keeps what it was given; as a callee it echoes calls back."""

    def __init__(self):
        self.endpoint: Endpoint | None = None
        self.messages: asyncio.Queue = asyncio.Queue()
        self.lost: asyncio.Queue = asyncio.Queue()
        self.echo = True

    def on_message(self, msg: Incoming):
        # Frames are views over received memory: keep copies.
        msg.frames = [bytes(f) for f in msg.frames]
        self.messages.put_nowait(msg)
        if self.echo and msg.route is not None and msg.envelope.kind is Kind.CALL:
            return self.endpoint.reply(msg.route, Envelope(Kind.REPLY, msg.envelope.corr),
                                       msg.frames)
        return None

    def on_peer_lost(self, address: str, reason: str) -> None:
        self.lost.put_nowait((address, reason))

    async def next(self, timeout: float = 5.0) -> Incoming:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def nothing_arrives(self, wait: float = 0.3) -> None:
        await asyncio.sleep(wait)
        assert self.messages.empty(), f"unexpected message {self.messages.get_nowait()}"


async def start(bind="tcp://127.0.0.1:0", secret=SECRET, **kwargs) -> tuple[Endpoint, Recorder]:
    handler = Recorder()
    endpoint = handler.endpoint = Endpoint(handler, bind, secret=secret, **kwargs)
    await endpoint.start()
    return endpoint, handler


@pytest.fixture
async def pair():
    """(server, its recorder, client, its recorder), closed afterwards."""
    server, srv = await start()
    client, cli = await start()
    yield server, srv, client, cli
    await client.close()
    await server.close()


def error_body(msg: Incoming) -> dict:
    assert msg.envelope.kind is Kind.ERROR, msg.envelope
    return msgpack.unpackb(msg.frames[0])


async def round_trip(client, cli, address, corr, payload=b"ping") -> Incoming:
    await client.send(address, Envelope(Kind.CALL, corr, "c", "t", "m"), [payload])
    answer = await cli.next()
    assert (answer.envelope.kind, answer.envelope.corr) == (Kind.REPLY, corr)
    assert answer.frames == [payload]
    return answer


# -- directions and order ----------------------------------------------------------------


async def test_requests_arrive_on_the_router_and_answers_on_the_dealer(pair):
    server, srv, client, cli = pair
    env = Envelope(Kind.CALL, 7, "caller", "echo-1", "echo", 1500)
    await client.send(server.address, env, [b"body", b"buffer"])
    request = await srv.next()
    assert request.envelope == env and request.frames == [b"body", b"buffer"]
    assert request.route is not None and request.peer is None
    answer = await cli.next()
    assert answer.envelope == Envelope(Kind.REPLY, 7)
    assert answer.peer == server.address and answer.route is None
    assert answer.frames == [b"body", b"buffer"]


async def test_every_request_kind_reaches_the_callee_and_heartbeats_stay_in_the_transport(pair):
    server, srv, client, _ = pair
    srv.echo = False
    for corr, kind in enumerate(sorted(TO_CALLEE), start=1):
        await client.send(server.address, Envelope(kind, corr, credit=3), [b"x"])
    seen = []
    for _ in range(len(TO_CALLEE) - 1):
        seen.append((await srv.next()).envelope.kind)
    assert seen == sorted(TO_CALLEE - {Kind.HEARTBEAT})
    await srv.nothing_arrives()


async def test_every_answer_kind_reaches_the_caller(pair):
    server, srv, client, cli = pair
    srv.echo = False
    await client.send(server.address, Envelope(Kind.STREAM, 1, credit=8), [b"open"])
    route = (await srv.next()).route
    answers = sorted(TO_CALLER - {Kind.HEARTBEAT})
    for kind in answers:
        assert await server.reply(route, Envelope(kind, 1), [b"a"])
    assert await server.probe(route)  # a HEARTBEAT: answered by nobody, delivered to nobody
    assert [(await cli.next()).envelope.kind for _ in answers] == answers
    await cli.nothing_arrives()


async def test_messages_from_one_sender_arrive_in_the_order_sent(pair):
    server, srv, client, cli = pair
    n = 2000
    for corr in range(1, n + 1):
        kind = Kind.TELL if corr % 3 else Kind.CALL
        await client.send(server.address, Envelope(kind, corr), [corr.to_bytes(4, "little")])
    received = [(await srv.next()).envelope.corr for _ in range(n)]
    assert received == list(range(1, n + 1))
    replies = [(await cli.next()).envelope.corr for _ in range(n // 3)]
    assert replies == [c for c in range(1, n + 1) if c % 3 == 0]


async def test_two_endpoints_call_each_other_over_separate_connections(pair):
    server, srv, client, cli = pair
    await round_trip(client, cli, server.address, 1)
    assert (await srv.next()).envelope.kind is Kind.CALL  # the server handled the call
    await round_trip(server, srv, client.address, 2)
    assert (await cli.next()).envelope.kind is Kind.CALL
    await round_trip(client, cli, server.address, 3)


async def test_ipc_addresses_work(tmp_path):
    server, srv = await start(f"ipc://{tmp_path}/server.sock")
    client, cli = await start(f"ipc://{tmp_path}/client.sock")
    try:
        assert server.address == f"ipc://{tmp_path}/server.sock"
        await round_trip(client, cli, server.address, 1, b"over ipc")
        assert (await srv.next()).frames == [b"over ipc"]
        await round_trip(server, srv, client.address, 2, b"and back")
    finally:
        await client.close()
        await server.close()
    assert not (tmp_path / "server.sock").exists()


async def test_a_stale_ipc_socket_file_is_replaced(tmp_path):
    (tmp_path / "stale.sock").write_bytes(b"")
    server, _ = await start(f"ipc://{tmp_path}/stale.sock")
    client, cli = await start()
    try:
        await round_trip(client, cli, server.address, 1)
    finally:
        await client.close()
        await server.close()


# -- limits --------------------------------------------------------------------------------


SMALL = Limits(max_frames=4, max_frame_bytes=1000, max_message_bytes=2500)


@pytest.mark.parametrize("frames, limit", [
    ([b"x" * 1001], "1000"),  # just over the frame limit
    ([b"x" * 1900], "1000"),  # almost twice the frame limit
    ([b"x" * 900] * 3, "2500"),  # every frame fits, the message does not
    ([b"x"] * 6, "5"),  # too many frames (body + 4 buffers)
], ids=["frame", "frame-1.9x", "message", "frame-count"])
async def test_an_oversized_message_gets_an_error_naming_the_limit_and_the_connection_survives(
        frames, limit):
    server, srv = await start(limits=SMALL)
    client, cli = await start()
    try:
        await round_trip(client, cli, server.address, 1)
        await client.send(server.address, Envelope(Kind.CALL, 2, "c", "t", "m"), frames)
        body = error_body(await cli.next())
        assert body["code"] == "bad_request" and limit in body["message"], body
        assert server.counters["rejected"] == 1
        await round_trip(client, cli, server.address, 3)
        # Only the two good calls reached the handler.
        assert [(await srv.next()).envelope.corr for _ in range(2)] == [1, 3]
        await srv.nothing_arrives(0.1)
        assert cli.lost.empty()
    finally:
        await client.close()
        await server.close()


async def test_a_message_far_over_the_limit_gets_an_error_and_the_connection_survives():
    server, _ = await start(limits=SMALL)
    client, cli = await start()
    try:
        await round_trip(client, cli, server.address, 1)
        await client.send(server.address, Envelope(Kind.CALL, 2), [b"x" * 100_000])
        body = error_body(await cli.next())
        assert "1000" in body["message"]
        await round_trip(client, cli, server.address, 3)
        assert cli.lost.empty()
    finally:
        await client.close()
        await server.close()


async def test_an_oversized_tell_is_dropped_and_counted_without_an_answer():
    server, srv = await start(limits=SMALL)
    client, cli = await start()
    try:
        await client.send(server.address, Envelope(Kind.TELL, 0), [b"x" * 1500])
        await round_trip(client, cli, server.address, 1)
        assert server.counters["rejected"] == 1
        assert (await srv.next()).envelope.corr == 1
        await cli.nothing_arrives(0.1)
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize("kind", [Kind.REPLY, Kind.ERROR, Kind.STREAM_ITEM, Kind.STREAM_END])
async def test_an_oversized_answer_fails_its_call_at_once_instead_of_at_its_deadline(kind):
    """The caller cannot accept the answer, but it knows which call it answers: the handler
    gets an ERROR for that call, naming the limit, and the connection stays usable."""
    server, srv = await start()
    client, cli = await start(limits=SMALL)
    srv.echo = False
    try:
        await client.send(server.address, Envelope(Kind.CALL, 1), [b"x"])
        route = (await srv.next()).route
        assert await server.reply(route, Envelope(kind, 1), [b"x" * 5000])
        body = error_body(await cli.next())
        assert body["code"] == "bad_request" and "1000" in body["message"], body
        assert server.address in body["message"]
        assert client.counters["rejected"] == 1
        srv.echo = True
        await round_trip(client, cli, server.address, 2)
        assert cli.lost.empty()
    finally:
        await client.close()
        await server.close()


# -- bad headers and wrong directions -------------------------------------------------------


async def test_a_bad_header_with_a_readable_corr_gets_an_error_reply(pair):
    server, _, client, cli = pair
    bad = msgpack.packb([99, 1, 5, "c", "t", "m", 0, 0])  # protocol version 99
    conn = client._connect(server.address)
    conn.sock.send_multipart([bad, b"\xc0"])
    body = error_body(await cli.next())
    assert body["code"] == "bad_request" and "protocol version 99" in body["message"]
    assert server.counters["rejected"] == 1
    await round_trip(client, cli, server.address, 6)


async def test_answer_kinds_sent_to_a_callee_are_rejected_without_a_reply(pair):
    server, srv, client, cli = pair
    for corr, kind in enumerate(sorted(TO_CALLER - TO_CALLEE), start=1):
        await client.send(server.address, Envelope(kind, corr), [b"\xc0"])
    await round_trip(client, cli, server.address, 100)
    assert (await srv.next()).envelope.corr == 100  # only the real call got through
    assert server.counters["rejected"] == len(TO_CALLER - TO_CALLEE)
    await cli.nothing_arrives(0.1)  # no ping-pong of errors


async def test_request_kinds_sent_to_a_caller_are_rejected(pair):
    server, srv, client, cli = pair
    srv.echo = False
    await client.send(server.address, Envelope(Kind.CALL, 1), [b"x"])
    route = (await srv.next()).route
    for corr, kind in enumerate(sorted(TO_CALLEE - TO_CALLER), start=1):
        assert await server.reply(route, Envelope(kind, corr), [b"\xc0"])
    assert await server.reply(route, Envelope(Kind.REPLY, 1), [b"ok"])
    answer = await cli.next()
    assert answer.envelope.kind is Kind.REPLY and answer.frames == [b"ok"]
    assert client.counters["rejected"] == len(TO_CALLEE - TO_CALLER)
    await srv.nothing_arrives(0.1)


async def test_an_empty_message_is_dropped_and_counted(pair):
    server, _, client, cli = pair
    await client.send(server.address, Envelope(Kind.CALL, 1), [b"x"])
    await cli.next()
    conn = client._conns[server.address]
    conn.sock.send(b"")  # one empty frame: a header that is not msgpack
    await round_trip(client, cli, server.address, 2)
    assert server.counters["rejected"] == 1


# -- replies to vanished callers ---------------------------------------------------------


async def test_a_reply_to_a_vanished_route_returns_false_and_is_counted():
    server, srv = await start()
    client, _ = await start()
    srv.echo = False
    try:
        await client.send(server.address, Envelope(Kind.CALL, 1), [b"x"])
        route = (await srv.next()).route
        assert await server.probe(route)
        await client.close()
        deadline = time.monotonic() + 3
        while await server.probe(route):  # the ROUTER learns of the close asynchronously
            assert time.monotonic() < deadline, "the route outlived its connection"
            await asyncio.sleep(0.02)
        before = server.counters["reply_unroutable"]
        assert await server.reply(route, Envelope(Kind.REPLY, 1), [b"late"]) is False
        assert server.counters["reply_unroutable"] == before + 1
        assert await server.reply(os.urandom(20), Envelope(Kind.REPLY, 2)) is False
    finally:
        await server.close()


async def test_sending_after_close_fails_cleanly():
    server, _ = await start()
    client, _ = await start()
    await client.close()
    with pytest.raises(TransportError, match="closed"):
        await client.send(server.address, Envelope(Kind.CALL, 1))
    assert await client.reply(b"route", Envelope(Kind.REPLY, 1)) is False
    await server.close()
    await server.close()  # idempotent


# -- authentication ------------------------------------------------------------------------


def raw_dealer(ctx: zmq.Context, address: str, keys: auth.CurveKeys | None = None,
               server_public: bytes | None = None) -> zmq.Socket:
    """A DEALER outside any Endpoint: with the CURVE client ``keys`` derived from a secret,
    or with the right ``server_public`` key but a client key pair of its own."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        auth.configure_client(sock, keys)
    if server_public is not None:
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = server_public
    sock.connect(address)
    return sock


def hello(corr: int) -> list:
    return [pack_header(Envelope(Kind.CALL, corr, "intruder", "t", "m")), b"\xc0"]


async def test_a_peer_without_curve_never_reaches_the_handler(pair):
    server, srv, client, cli = pair
    ctx = zmq.Context()
    sock = raw_dealer(ctx, server.address)
    try:
        for corr in range(10):
            sock.send_multipart(hello(corr), zmq.NOBLOCK)
        deadline = time.monotonic() + 3
        while server.counters["handshake_failures"] == 0:
            assert time.monotonic() < deadline, "the failed handshake was not counted"
            await asyncio.sleep(0.05)
        await srv.nothing_arrives()
        assert sock.poll(0) == 0  # and nothing came back to it
        await round_trip(client, cli, server.address, 1)  # members are still served
    finally:
        sock.close()
        ctx.term()


async def test_a_peer_with_a_wrong_secret_never_reaches_the_handler(pair):
    server, srv, client, cli = pair
    ctx = zmq.Context()
    sock = raw_dealer(ctx, server.address, auth.derive_keys(b"some-other-secret-0123456789"))
    try:
        sock.send_multipart(hello(1), zmq.NOBLOCK)
        deadline = time.monotonic() + 3
        while server.counters["handshake_failures"] == 0:
            assert time.monotonic() < deadline, "the failed handshake was not counted"
            await asyncio.sleep(0.05)
        await srv.nothing_arrives()
        await round_trip(client, cli, server.address, 1)
    finally:
        sock.close()
        ctx.term()


async def test_a_peer_that_knows_the_server_key_but_not_the_client_key_is_refused_by_zap(pair):
    server, srv, client, cli = pair
    ctx = zmq.Context()
    sock = raw_dealer(ctx, server.address, server_public=server.keys.server_public)
    try:
        sock.send_multipart(hello(1), zmq.NOBLOCK)
        deadline = time.monotonic() + 3
        while server._zap.rejected == 0:
            assert time.monotonic() < deadline, "the ZAP handler did not refuse the key"
            await asyncio.sleep(0.05)
        await srv.nothing_arrives()
        assert server.counters["handshake_failures"] >= 1
        await round_trip(client, cli, server.address, 1)
        assert server._zap.accepted >= 1
    finally:
        sock.close()
        ctx.term()


async def test_an_endpoint_with_a_wrong_secret_reports_the_peer_lost_for_authentication(pair):
    server, srv, client, cli = pair
    intruder, seen = await start(secret=b"not-the-cluster-secret-0123")
    try:
        await intruder.send(server.address, Envelope(Kind.CALL, 1), [b"x"])
        address, reason = await asyncio.wait_for(seen.lost.get(), 5)
        assert address == server.address and "cluster secret" in reason
        assert intruder.counters["peers_lost"] == 1
        await srv.nothing_arrives()
        assert server.counters["handshake_failures"] >= 1
        await round_trip(client, cli, server.address, 2)
    finally:
        await intruder.close()


async def test_an_endpoint_without_a_secret_cannot_reach_a_secured_one(pair):
    server, srv, _, _ = pair
    plain, seen = await start(secret=None, heartbeat=FAST)
    try:
        await plain.send(server.address, Envelope(Kind.CALL, 1), [b"x"])
        address, _ = await asyncio.wait_for(seen.lost.get(), 5)
        assert address == server.address
        await srv.nothing_arrives(0.1)
    finally:
        await plain.close()


# -- lost peers (separate processes) ----------------------------------------------------------

PEER = textwrap.dedent("""
    import asyncio, sys
    from transport.endpoint import Endpoint, Heartbeat
    from transport.envelope import Envelope, Kind

    class Echo:
        def on_message(self, msg):
            if msg.envelope.kind is Kind.CALL:
                return endpoint.reply(msg.route, Envelope(Kind.REPLY, msg.envelope.corr),
                                      [bytes(f) for f in msg.frames])
        def on_peer_lost(self, address, reason):
            pass

    async def main():
        global endpoint
        endpoint = Endpoint(Echo(), secret=bytes.fromhex(sys.argv[1]),
                            heartbeat=Heartbeat(0.2, 1.0))
        print(await endpoint.start(), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


@pytest.fixture
async def peer():
    """An echoing endpoint in another process: (Popen, its address)."""
    proc = subprocess.Popen([sys.executable, "-c", PEER, SECRET.hex()], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.startswith("tcp://"), f"peer did not start: {line!r}"
        yield proc, line.strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


async def lost_after_signal(proc, address, sig) -> tuple[float, str]:
    client, cli = await start(heartbeat=FAST)
    try:
        await round_trip(client, cli, address, 1)
        start_time = time.monotonic()
        proc.send_signal(sig)
        lost_address, reason = await asyncio.wait_for(cli.lost.get(), 10)
        elapsed = time.monotonic() - start_time
        assert lost_address == address
        assert client.counters["peers_lost"] == 1
        return elapsed, reason
    finally:
        await client.close()


async def test_a_killed_peer_is_reported_lost_at_once(peer):
    proc, address = peer
    elapsed, reason = await lost_after_signal(proc, address, signal.SIGKILL)
    assert elapsed < 2.0, f"lost only after {elapsed:.2f}s"
    assert "connection closed" in reason


async def test_a_hung_peer_is_reported_lost_after_the_heartbeat_timeout(peer):
    proc, address = peer
    elapsed, reason = await lost_after_signal(proc, address, signal.SIGSTOP)
    # The kernel keeps its TCP connection open: only the heartbeats can tell.
    assert 0.5 < elapsed < FAST.timeout + 1.5, f"lost after {elapsed:.2f}s"
    assert "heartbeat" in reason


async def test_a_send_to_an_address_where_nothing_listens_is_reported_lost():
    gone, _ = await start()
    await gone.close()
    client, cli = await start(heartbeat=FAST)
    try:
        started = time.monotonic()
        await client.send(gone.address, Envelope(Kind.CALL, 1), [b"x"])
        address, reason = await asyncio.wait_for(cli.lost.get(), 5)
        assert address == gone.address and "no connection" in reason
        assert FAST.timeout * 0.9 < time.monotonic() - started < FAST.timeout + 1.5
    finally:
        await client.close()
