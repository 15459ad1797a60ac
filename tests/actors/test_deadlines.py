"""Deadlines: every wait ends with an error that names the actor, the method, the address
and the deadline, and work nobody waits for any more is cancelled or skipped."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors import AskTimeout

from .conftest import eventually, new_system
from .sample_actors import Producer, SerialSleeper, Sleeper

WHERE = ["local", "process"]


@pytest.mark.parametrize("where", WHERE)
async def test_timed_out_ask_names_everything_and_is_cancelled_on_the_callee(system, where):
    sleeper = await system.spawn(Sleeper, name="sleepy", where=where)
    started = time.monotonic()
    with pytest.raises(AskTimeout) as info:
        await sleeper.ask("nap", 30, "long", timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 3, elapsed
    message = str(info.value)
    for part in ("sleepy", "nap()", sleeper.address, "0.5s"):
        assert part in message, (part, message)
    assert isinstance(info.value, TimeoutError)  # so `except TimeoutError` catches it too

    # The callee stops working on it: the method sees the cancellation (long before 30 s).
    async def cancelled():
        return ["cancelled", "long"] in await sleeper.ask("log")
    await eventually(cancelled, timeout=5, what="the timed-out nap to be cancelled")
    assert ["finished", "long"] not in await sleeper.ask("log")


@pytest.mark.parametrize("where", WHERE)
async def test_a_call_that_expires_in_the_mailbox_never_runs(system, where):
    sleeper = await system.spawn(SerialSleeper, where=where)
    await sleeper.tell("nap", 1.0, "first")
    with pytest.raises(AskTimeout):
        await sleeper.ask("nap", 0, "queued", timeout=0.3)  # queued behind the first
    log = await sleeper.ask("log")  # queued behind both
    assert ["started", "first"] in log and ["finished", "first"] in log
    assert not any(tag == "queued" for _, tag in log), log


async def test_stream_item_timeout_names_the_stream_and_stops_the_producer(system):
    producer = await system.spawn(Producer, where="process")
    items = []
    started = time.monotonic()
    with pytest.raises(AskTimeout) as info:
        async for item in producer.stream("produce", 5, 0.0, 2, timeout=1.0):
            items.append(item)
    assert items == [0, 1]
    assert time.monotonic() - started < 5
    assert "stream item" in str(info.value) and "produce()" in str(info.value)
    assert producer.address in str(info.value) and "1s" in str(info.value)

    async def producer_closed():
        return (await producer.ask("progress"))["closed"]
    await eventually(producer_closed, timeout=5, what="the producer's finally to run")


async def test_default_timeout_applies_when_none_is_given():
    async with new_system(default_timeout=0.5) as system:
        sleeper = await system.spawn(Sleeper)
        with pytest.raises(AskTimeout, match="0.5s deadline"):
            await sleeper.ask("nap", 10)


@pytest.mark.parametrize("where", WHERE)
async def test_deadlines_of_many_calls_hold_and_leave_nothing_behind(system, where):
    # Calls share deadline timers (actors.system._Deadlines): each must still end at its
    # own deadline, never before it, and the shared timers must go once no call needs them
    # (all but the newest slot's, kept for the next call, which one call at a time reuses).
    sleeper = await system.spawn(Sleeper, where=where)

    async def timed(seconds, timeout):
        started = time.monotonic()
        try:
            await sleeper.ask("nap", seconds, timeout=timeout)
            return "answered", time.monotonic() - started
        except AskTimeout:
            return "expired", time.monotonic() - started

    results = await asyncio.gather(*(timed(0.05 if i % 2 else 5, 0.3 + 0.002 * i) for i in range(4)),
                                   *(timed(0, 30) for _ in range(40)))
    for i, (outcome, elapsed) in enumerate(results[:4]):
        if i % 2:
            assert outcome == "answered"
        else:
            assert outcome == "expired" and 0.3 + 0.002 * i <= elapsed < 3, (i, elapsed)
    assert all(outcome == "answered" for outcome, _ in results[4:])
    for _ in range(10):  # each call in a slot of its own
        await sleeper.ask("nap", 0, timeout=30)
        await asyncio.sleep(2 * system._deadlines.GRAIN)
    slots = system._deadlines._slots
    assert len(slots) <= 1 and all(not futures for _, futures in slots.values()), slots
