"""FIFO per sender: what one sender sends to one actor is handled in the order sent, tells
and asks mixed, in this process and across processes, also while the actor's mailbox is
full and senders wait for room."""

from __future__ import annotations

import asyncio

from .sample_actors import Recorder, Sender, SlowRecorder


def per_sender(history: list) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for tag, i in history:
        seqs.setdefault(tag, []).append(i)
    return seqs


def check_sequence(seq: list[int], n: int, who: str) -> None:
    """``seq`` is 0..n-1 in order; else say what was lost, repeated or reordered."""
    if seq == list(range(n)):
        return
    missing = sorted(set(range(n)) - set(seq))
    repeated = sorted({i for i in seq if seq.count(i) > 1})
    first_bad = next((k for k, i in enumerate(seq) if k == 0 or i != seq[k - 1] + 1), None)
    raise AssertionError(
        f"{who}: {len(seq)} of {n} messages; missing {missing[:20]}, repeated "
        f"{repeated[:20]}, order breaks at position {first_bad}: "
        f"{seq[max(0, (first_bad or 0) - 3):(first_bad or 0) + 5]}")


async def send_numbered(target, tag: str, n: int, ask_every: int = 10) -> None:
    for i in range(n):
        if i % ask_every == 0:
            await target.ask("record", [tag, i])
        else:
            await target.tell("record", [tag, i])


async def test_tells_and_asks_from_one_sender_arrive_in_order(system):
    recorder = await system.spawn(Recorder)
    for i in range(1000):
        await recorder.tell("record", i)
    # An ask after many tells sees every one of them: it was queued behind them.
    assert await recorder.ask("history") == list(range(1000))


async def test_order_holds_while_senders_wait_for_a_full_mailbox(system):
    recorder = await system.spawn(SlowRecorder)
    await asyncio.gather(*(send_numbered(recorder, f"task{k}", 150) for k in range(3)))
    seqs = per_sender(await recorder.ask("history"))
    assert seqs == {f"task{k}": list(range(150)) for k in range(3)}


async def test_order_holds_per_sender_with_a_remote_sender_to_a_full_mailbox(system):
    """Another process and this one send to the same slow actor at the same time; each
    sender's messages arrive complete and in order."""
    recorder = await system.spawn(SlowRecorder)
    sender = await system.spawn(Sender, where="process")
    remote = asyncio.ensure_future(sender.ask("send", recorder, "remote", 400, 0))
    await send_numbered(recorder, "local", 200)
    assert await remote == 400
    seqs = per_sender(await recorder.ask("history"))
    assert seqs["local"] == list(range(200))
    assert seqs["remote"] == list(range(400)), "the remote sender's tells were lost or reordered"
    assert system.stats().get("tells_dropped_mailbox_full", 0) == 0


async def test_order_holds_between_two_processes(system):
    """This process and another one each send tells and asks to an actor in a third."""
    recorder, sender = await asyncio.gather(system.spawn(Recorder, where="process"),
                                            system.spawn(Sender, where="process"))
    remote = asyncio.ensure_future(sender.ask("send", recorder, "remote", 500, 7))
    await send_numbered(recorder, "local", 500)
    assert await remote == 500
    seqs = per_sender(await recorder.ask("history"))
    check_sequence(seqs.get("local", []), 500, "local sender")
    check_sequence(seqs.get("remote", []), 500, "remote sender")
