"""SocketReader: messages reach the callback in order, in batches per loop turn, and none is
stranded by the edge-triggered FD, whether the reader is woken by the FD or by a kick."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from transport.reactor import BATCH, SocketReader


@pytest.fixture
def pair():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.linger = 0
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    yield pull, push
    ctx.destroy(linger=0)


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_a_burst_is_taken_in_batches_not_one_message_per_loop_turn(pair):
    pull, push = pair
    n = 3 * BATCH
    for i in range(n):
        push.send(b"%d" % i)
    await asyncio.sleep(0.2)  # all of them wait in the PULL socket before a reader exists
    got, turns = [], []

    async def count_turns():  # one increment per loop turn
        while len(got) < n:
            turns.append(None)
            await asyncio.sleep(0)

    counting = asyncio.ensure_future(count_turns())
    await asyncio.sleep(0)
    reader = SocketReader(pull, got.append)
    try:
        await asyncio.wait_for(counting, 5)
        assert [int(p[0]) for p in got] == list(range(n))
        # One message per turn would take n turns; batches of BATCH take a handful.
        assert len(turns) <= n // BATCH + 4, len(turns)
    finally:
        reader.close()


async def test_lone_messages_one_at_a_time_all_arrive(pair):
    """Each message alone wakes the reader through the FD; a reader that did not re-arm
    the edge-triggered FD after taking one would never see the next."""
    pull, push = pair
    got = []
    reader = SocketReader(pull, got.append)
    try:
        for i in range(200):
            push.send(b"%d" % i)
            await until(lambda: len(got) == i + 1, timeout=2)
        assert [int(p[0]) for p in got] == list(range(200))
    finally:
        reader.close()
