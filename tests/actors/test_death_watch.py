"""Death watch: a watcher's on_terminated is called once when the actor it watches stops,
fails for good, or its process dies, wherever watcher and target live."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from actors import ActorRef

from .conftest import eventually
from .sample_actors import Echo, Watcher


async def notices(watcher) -> list:
    return await watcher.ask("notices")


async def one_notice(watcher, timeout: float = 10.0) -> list:
    """Wait for the first notice, give a duplicate a moment to show up, return the one."""
    await eventually(lambda: notices(watcher), timeout=timeout, what="on_terminated")
    await asyncio.sleep(0.3)
    found = await notices(watcher)
    assert len(found) == 1, f"told more than once: {found}"
    return found[0]


@pytest.mark.parametrize("watcher_where", ["local", "process"])
async def test_sigkill_of_the_watched_process_is_noticed_promptly(system, watcher_where):
    target = await system.spawn(Echo, where="process")
    watcher = await system.spawn(Watcher, where=watcher_where)
    await watcher.ask("watch_ref", target)
    assert await notices(watcher) == []
    pid = await target.ask("pid")
    # The watch is registered with the target's system asynchronously: a round trip from
    # the watcher's side makes sure it is in place before the kill.
    await watcher.ask("notices")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    who, reason, _ = await one_notice(watcher)
    assert time.monotonic() - killed < 5
    assert who == target.actor_id
    assert "gone" in reason or "exited" in reason, reason


async def test_normal_stop_is_noticed_by_local_and_remote_watchers(system):
    local_target = await system.spawn(Echo)
    local_watcher = await system.spawn(Watcher)
    remote_target, remote_watcher = await asyncio.gather(
        system.spawn(Echo, where="process"), system.spawn(Watcher, where="process"))
    for watcher in (local_watcher, remote_watcher):
        await watcher.ask("watch_ref", local_target)
    await local_watcher.ask("watch_ref", remote_target)

    await system.stop(local_target)
    for watcher in (local_watcher, remote_watcher):
        await eventually(lambda w=watcher: notices(w), what="the stop of the local actor")
    # (A remote watch is registered asynchronously: if the stop won that race, the
    # watcher is told that the actor is not running, which is just as good.)
    [[who, reason, _]] = await notices(remote_watcher)
    assert who == local_target.actor_id and ("stopped" in reason or "not running" in reason)

    await system.stop(remote_target)
    async def both():
        found = await notices(local_watcher)
        return found if len(found) == 2 else None
    found = await eventually(both, what="the stop of the remote actor")
    assert sorted(who for who, _, _ in found) == sorted([local_target.actor_id,
                                                         remote_target.actor_id])
    for who, reason, _ in found:
        assert any(why in reason for why in ("stopped", "exited with code 0", "not running"))


@pytest.mark.parametrize("where", ["local", "process"])
async def test_watching_an_actor_that_is_not_running_tells_at_once(system, where):
    host = await system.spawn(Echo, where=where)
    ghost = ActorRef(host.address, "never-existed", None, system)
    watcher = await system.spawn(Watcher)
    await watcher.ask("watch_ref", ghost)
    who, _, _ = await one_notice(watcher, timeout=5)
    assert who == "never-existed"


async def test_unwatch_stops_the_notices(system):
    target = await system.spawn(Echo)
    watcher = await system.spawn(Watcher)
    await watcher.ask("watch_ref", target)
    await watcher.ask("unwatch_ref", target)
    await system.stop(target)
    other = await system.spawn(Echo)
    await watcher.ask("watch_ref", other)
    await system.stop(other)
    # The notice about `other` arrives; none about `target` came before it.
    await eventually(lambda: notices(watcher))
    assert [who for who, _, _ in await notices(watcher)] == [other.actor_id]
