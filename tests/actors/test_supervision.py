"""Supervision: a failed child is restarted under the same ref (one-for-one or
one-for-all), too many failures escalate to the parent's own supervisor, and calls to an
actor that dies fail at once instead of at their deadline."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from actors import ActorDeadError, RemoteError, UnknownActorError

from .conftest import eventually, live_descendants
from .sample_actors import Flaky, GrandParent, Parent, TeamParent, Watcher


def starts(marker) -> int:
    return marker.read_text().count("start") if marker.exists() else 0


async def answers(ref, method: str = "ping"):
    """The ref's answer, or None while it is dead or restarting (a restarted process that
    is up but has not started its actor yet says it has no such actor)."""
    try:
        return await ref.ask(method, timeout=5)
    except (ActorDeadError, UnknownActorError):
        return None


async def test_crashing_local_child_is_restarted_under_the_same_ref(system, tmp_path):
    marker = tmp_path / "starts"
    parent = await system.spawn(Parent, "local", str(marker))
    [child] = await parent.ask("kids")
    before = await child.ask("incarnation")
    with pytest.raises(RemoteError, match="asked to crash"):
        await child.ask("crash")  # the caller sees the error; the child fails (crash_on_error)
    after = await eventually(lambda: answers(child, "incarnation"), what="the restart")
    assert after != before
    assert starts(marker) == 2
    assert await parent.ask("kids") == [child]


async def test_child_process_killed_with_sigkill_is_restarted_under_the_same_ref(
        system, tmp_path):
    marker = tmp_path / "starts"
    parent = await system.spawn(Parent, "process", str(marker))
    [child] = await parent.ask("kids")
    pid = await child.ask("pid")
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: starts(marker) == 2, timeout=20, what="the restart")
    new_pid = await eventually(lambda: answers(child, "pid"), timeout=20,
                               what="the restarted child to answer under the same ref")
    assert new_pid not in (pid, os.getpid())
    assert await parent.ask("kids") == [child]


@pytest.mark.slow
async def test_child_process_that_crashes_too_often_escalates(system, tmp_path):
    marker = tmp_path / "starts"
    parent = await system.spawn(Parent, "process", str(marker))  # 2 restarts within 30 s
    watcher = await system.spawn(Watcher)
    await watcher.ask("watch_ref", parent)
    [child] = await parent.ask("kids")
    pids = [await child.ask("pid")]
    for restart in (1, 2):
        with pytest.raises(RemoteError, match="asked to crash"):
            await child.ask("crash")
        await eventually(lambda n=restart + 1: starts(marker) == n, timeout=20)
        pids.append(await eventually(lambda: answers(child, "pid"), timeout=20))
    assert len(set(pids)) == 3
    with pytest.raises(RemoteError):
        await child.ask("crash")
    [[who, reason, _]] = await eventually(lambda: watcher.ask("notices"), timeout=20)
    assert who == parent.actor_id and "EscalationError" in reason
    with pytest.raises(ActorDeadError):
        await child.ask("ping", timeout=10)
    await eventually(lambda: not live_descendants(), timeout=15, what="the child to exit")


async def test_one_for_all_restarts_the_siblings_too(system, tmp_path):
    marker = tmp_path / "starts"
    parent = await system.spawn(TeamParent, "local", str(marker), 2)
    kids = await parent.ask("kids")
    assert len(kids) == 2
    before = [await kid.ask("incarnation") for kid in kids]
    with pytest.raises(RemoteError):
        await kids[0].ask("crash")
    await eventually(lambda: starts(marker) == 4, what="both children to restart")
    after = [await eventually(lambda k=kid: answers(k, "incarnation")) for kid in kids]
    assert after[0] != before[0] and after[1] != before[1]
    assert await parent.ask("kids") == kids


async def test_one_for_one_leaves_the_siblings_alone(system, tmp_path):
    marker = tmp_path / "starts"
    parent = await system.spawn(Parent, "local", str(marker), 2)
    kids = await parent.ask("kids")
    sibling = await kids[1].ask("incarnation")
    with pytest.raises(RemoteError):
        await kids[0].ask("crash")
    await eventually(lambda: starts(marker) == 3, what="the failed child to restart")
    assert await kids[1].ask("incarnation") == sibling


async def test_too_many_failures_stop_a_top_level_parent_and_tell_its_watchers(system):
    parent = await system.spawn(Parent)  # at most 2 restarts within 30 s
    watcher = await system.spawn(Watcher)
    await watcher.ask("watch_ref", parent)
    [child] = await parent.ask("kids")
    for restart in range(2):
        with pytest.raises(RemoteError):
            await child.ask("crash")
        await eventually(lambda: answers(child), what=f"restart {restart + 1}")
    with pytest.raises(RemoteError):
        await child.ask("crash")  # one failure too many: the parent escalates

    [[who, reason, _]] = await eventually(lambda: watcher.ask("notices"),
                                          what="the watcher to hear of the parent")
    assert who == parent.actor_id
    assert "EscalationError" in reason and child.actor_id in reason
    with pytest.raises(ActorDeadError):
        await parent.ask("kids")
    with pytest.raises(ActorDeadError):
        await child.ask("ping")


async def test_escalation_restarts_the_parent_under_its_own_supervisor(system):
    grandparent = await system.spawn(GrandParent)
    [parent] = await grandparent.ask("kids")
    first = await parent.ask("incarnation")
    [child] = await parent.ask("kids")
    for _ in range(2):
        with pytest.raises(RemoteError):
            await child.ask("crash")
        await eventually(lambda: answers(child))
    with pytest.raises(RemoteError):
        await child.ask("crash")  # the parent escalates; the grandparent restarts it

    async def restarted():
        return await answers(parent, "incarnation") not in (None, first)
    await eventually(restarted, what="the parent's restart")
    [new_child] = await parent.ask("kids")  # the restarted parent started a fresh child
    assert new_child != child and await new_child.ask("ping") == "pong"
    assert await grandparent.ask("kids") == [parent]


@pytest.mark.parametrize("how", ["failure", "sigkill"])
async def test_calls_in_flight_fail_at_once_when_the_actor_dies(system, how):
    where = "local" if how == "failure" else "process"
    victim = await system.spawn(Flaky, where=where)
    pid = await victim.ask("pid")
    if how == "failure":  # a background task of the actor fails while it is busy
        await victim.ask("fail_soon", 0.5)
    running = asyncio.ensure_future(victim.ask("sleep", 30, timeout=25))
    queued = asyncio.ensure_future(victim.ask("sleep", 30, timeout=25))
    started = time.monotonic()
    if how == "sigkill":
        await eventually(lambda: len(system._pending) >= 2, what="both calls sent")
        os.kill(pid, signal.SIGKILL)
    for call in (running, queued):
        with pytest.raises(ActorDeadError):
            await call
    assert time.monotonic() - started < 3, "the calls failed at their timeout, not at once"


async def test_calls_queued_behind_the_failing_one_fail_as_dead(system):
    """The failed instance answers nothing more: what was queued behind the call that
    crashed it fails with ActorDeadError (the restarted instance starts afresh)."""
    parent = await system.spawn(Parent)
    [child] = await parent.ask("kids")
    before = await child.ask("incarnation")
    crash = asyncio.ensure_future(child.ask("crash"))
    queued = [asyncio.ensure_future(child.ask("incarnation")) for _ in range(3)]
    with pytest.raises(RemoteError):
        await crash
    for call in queued:
        try:
            answer = await call
        except ActorDeadError:
            continue
        assert answer != before, "the failed instance handled a call queued after its failure"


@pytest.mark.slow
async def test_one_for_all_restarts_sibling_processes_too(system, tmp_path):
    marker = tmp_path / "starts"
    parent = await system.spawn(TeamParent, "process", str(marker), 2)
    kids = await parent.ask("kids")
    pids = [await kid.ask("pid") for kid in kids]
    os.kill(pids[0], signal.SIGKILL)
    await eventually(lambda: starts(marker) == 4, timeout=30, what="both children to restart")
    new_pids = [await eventually(lambda k=kid: answers(k, "pid"), timeout=20) for kid in kids]
    assert not set(new_pids) & set(pids)
    assert await parent.ask("kids") == kids
