"""Streams: flow control keeps the producer at most ``window`` items ahead of its consumer,
and a consumer that leaves (break, cancellation, death) stops the producer, whose finally
blocks run."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from actors import ActorDeadError

from .conftest import eventually
from .sample_actors import Consumer, Producer

WHERE = ["local", "process"]


async def progress(producer) -> dict:
    return await producer.ask("progress", timeout=10)


@pytest.mark.parametrize("where", WHERE)
async def test_producer_stays_within_the_window(system, where):
    producer = await system.spawn(Producer, where=where)
    window = 8
    # A producer can be at most `window` items ahead, plus the one it is holding while it
    # waits for credit.
    limit = window + 1
    stream = producer.stream("produce", 200, window=window)
    consumed = []
    async for item in stream:
        consumed.append(item)
        if len(consumed) == 5:
            break_at = len(consumed)
            break
    # The consumer has stopped taking items (but keeps the stream open): the producer
    # runs ahead, but only up to the window.
    await eventually(lambda: _ahead_by(producer, break_at), what="the producer to run ahead")
    seen = []
    for _ in range(20):  # watch it for a while: it stays within the window
        seen.append(await _ahead_by(producer, break_at))
        await asyncio.sleep(0.02)
    assert max(seen) <= limit, seen
    assert max(seen) >= window // 2, f"no pipelining: {seen}"
    async for item in stream:
        consumed.append(item)
        assert (await progress(producer))["produced"] - len(consumed) <= limit
    assert consumed == list(range(200))


async def _ahead_by(producer, consumed: int) -> int:
    return max(0, (await progress(producer))["produced"] - consumed)


@pytest.mark.parametrize("where", WHERE)
async def test_break_cancels_the_producer(system, where):
    producer = await system.spawn(Producer, where=where)
    taken = []
    async for item in producer.stream("produce", 100_000, 0.001, window=4):
        taken.append(item)
        if len(taken) == 3:
            break
    state = await eventually(_closed(producer), timeout=5, what="the producer's finally")
    assert state["produced"] < 100, state
    # The actor is free again for the next stream.
    assert [x async for x in producer.stream("produce", 3)] == [0, 1, 2]


def _closed(producer):
    async def check():
        state = await progress(producer)
        return state if state["closed"] else None
    return check


async def test_cancelling_the_consumer_task_cancels_the_producer(system):
    producer = await system.spawn(Producer, where="process")

    async def consume():
        async for _ in producer.stream("produce", 100_000, 0.001, window=4):
            pass

    task = asyncio.ensure_future(consume())
    await eventually(lambda: _ahead_by(producer, 0), what="the stream to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(_closed(producer), timeout=5, what="the producer's finally")


async def test_a_consumer_process_that_dies_stops_the_producer(system):
    producer = await system.spawn(Producer)
    consumer = await system.spawn(Consumer, where="process")
    pid = await consumer.ask("pid")
    opened = asyncio.ensure_future(
        consumer.ask("take_then_stall", producer, "produce", 2, 100_000, timeout=60))
    await eventually(lambda: _ahead_by(producer, 2), what="the producer to fill the window")
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    await eventually(_closed(producer), timeout=10, what="the producer's finally")
    assert time.monotonic() - started < 5
    with pytest.raises(ActorDeadError):
        await opened
