"""Backpressure: a bounded mailbox makes fast senders wait (until their deadline), so that
memory stays bounded however far the senders outrun the actor."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from actors import MailboxFullError

from .conftest import eventually
from .sample_actors import Flooder, Slow

MiB = 1 << 20


async def fill(slow, busy: float) -> None:
    """Keep ``slow`` busy for ``busy`` seconds and fill its mailbox (capacity 4)."""
    await slow.tell("work", busy)
    await eventually(lambda: slow.system._cells[slow.actor_id].mailbox.__len__() == 0)
    for _ in range(Slow.mailbox_size):
        await slow.tell("work", 0.0, timeout=1)


@pytest.mark.parametrize("call", ["ask", "tell"])
async def test_a_sender_to_a_full_mailbox_gets_mailbox_full_at_its_deadline(system, call):
    slow = await system.spawn(Slow)
    await fill(slow, 1.5)
    started = time.monotonic()
    with pytest.raises(MailboxFullError, match="mailbox of actor .*slow"):
        await getattr(slow, call)("work", 0.0, timeout=0.5)
    assert 0.45 <= time.monotonic() - started < 2.5


async def test_a_waiting_sender_gets_in_when_room_frees_up(system):
    slow = await system.spawn(Slow)
    await fill(slow, 0.5)
    started = time.monotonic()
    await slow.tell("work", 0.0, timeout=10)  # waits for the busy call to end, then fits
    assert time.monotonic() - started >= 0.3
    assert await slow.ask("count") == Slow.mailbox_size + 2


async def test_senders_beyond_the_line_wait_and_an_impatient_one_does_not_hurt_them(system):
    """More senders than the mailbox has places in line: they all wait (until their own
    deadlines), and one of them giving up leaves the others waiting."""
    slow = await system.spawn(Slow)
    await fill(slow, 1.0)
    patient = [asyncio.ensure_future(slow.tell("work", 0.0, timeout=20))
               for _ in range(2 * Slow.mailbox_size)]
    mailbox = system._cells[slow.actor_id].mailbox
    await eventually(lambda: mailbox.waiting == Slow.mailbox_size, what="a full line")
    with pytest.raises(MailboxFullError):  # behind the patient ones, out of the line
        await slow.tell("work", 0.0, timeout=0.2)
    await asyncio.gather(*patient)
    assert await slow.ask("count") == 1 + Slow.mailbox_size + len(patient)


async def test_a_remote_flood_is_held_back_and_memory_stays_bounded(system):
    """A process floods a stalled actor here with tells of 16 KiB. The actor's mailbox and
    its line of waiting senders never exceed the capacity, this process does not grow by
    the flood's size, and the flooding sender ends up timing out. Every tell that was
    accepted is delivered once the actor gets going again."""
    slow = await system.spawn(Slow)
    flooder = await system.spawn(Flooder, where="process")
    mailbox = system._cells[slow.actor_id].mailbox
    n, size = 20_000, 16 * 1024  # 320 MiB if nothing held the sender back
    rss_before = psutil.Process().memory_info().rss
    flooder_rss_before = await flooder.ask("rss")

    peaks = {"queued": 0, "waiting": 0}
    sampling = True

    async def sample():
        while sampling:
            peaks["queued"] = max(peaks["queued"], len(mailbox))
            peaks["waiting"] = max(peaks["waiting"], mailbox.waiting)
            await asyncio.sleep(0.001)

    sampler = asyncio.ensure_future(sample())
    try:
        await slow.tell("work", 6.0)  # stalls the actor while the flood comes in
        result = await flooder.ask("flood", slow, n, size, 1.0, timeout=30)
        rss_after = psutil.Process().memory_info().rss
    finally:
        sampling = False
        await sampler
    assert result["error"] in ("AskTimeout", "MailboxFullError"), result
    assert result["sent"] < n // 2, result
    assert peaks["queued"] <= Slow.mailbox_size and peaks["waiting"] <= Slow.mailbox_size
    assert rss_after - rss_before < 100 * MiB, (rss_after - rss_before) / MiB
    assert result["rss"] - flooder_rss_before < 100 * MiB

    await eventually(lambda: _handled(slow, result["sent"] + 1), timeout=30,
                     what="every accepted tell to be handled")


async def _handled(slow, expected: int) -> bool:
    count = await slow.ask("count")
    assert count <= expected, f"{count} handled, but only {expected} were accepted"
    return count == expected
