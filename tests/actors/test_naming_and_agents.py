"""Named actors are found by name from any process of the cluster; a NodeAgent starts
actors in processes on its node, and when the agent dies they die with it and calls to
them fail with ActorDeadError."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import psutil
import pytest

from actors import ActorDeadError, SpawnError, UnknownActorError

from .conftest import eventually, pid_alive
from .sample_actors import Echo, Finder, Parent, Watcher


async def test_a_named_actor_is_found_from_another_process(system):
    echo, finder = await asyncio.gather(system.spawn(Echo, name="svc", where="process"),
                                        system.spawn(Finder, where="process"))
    assert await system.lookup("svc") == echo
    assert await finder.ask("find", "svc") == echo
    assert await finder.ask("find_and_ask", "svc", "echo", "by name") == "by name"
    assert await finder.ask("find", "no-such-name") is None

    # An actor started (and named) inside another process is registered cluster-wide too.
    inner = await finder.ask("start_named", "inner")
    found = await system.lookup("inner")
    assert found == inner and found.address == finder.address
    assert await finder.ask("find_and_ask", "inner", "echo", 7) == 7


async def test_a_name_is_unique_while_its_actor_lives_and_free_after(system):
    first = await system.spawn(Echo, name="unique")
    with pytest.raises(SpawnError, match="'unique' is taken"):
        await system.spawn(Echo, name="unique")
    with pytest.raises(SpawnError, match="'unique' is taken"):
        await system.spawn(Echo, name="unique", where="process")
    await system.stop(first)
    await eventually(lambda: _gone(system, "unique"), what="the name to be freed")
    second = await system.spawn(Echo, name="unique")
    assert second != first and await system.lookup("unique") == second


async def _gone(system, name: str) -> bool:
    return await system.lookup(name) is None


@pytest.fixture
async def agent(system, pythonpath):
    """A NodeAgent process for node n2, on another loopback address."""
    env = {**os.environ, "ASYSTEM_SECRET": system.secret.hex(), "PYTHONPATH": pythonpath}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.agent", "--bind", "tcp://127.0.0.2:0",
        "--head", system.address, "--node", "n2", env=env, stdout=asyncio.subprocess.PIPE)
    leftovers: list[int] = []
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"node agent n2 at tcp://127.0.0.2:" in line, line
        yield proc, leftovers
    finally:
        leftovers += [c.pid for c in _children(proc.pid)]
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        # Its children must go by themselves; if a test failed half-way, make sure.
        try:
            await eventually(lambda: not any(pid_alive(p) for p in leftovers), timeout=10,
                             what="the agent's children to exit")
        finally:
            for pid in leftovers:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


async def test_spawn_through_a_node_agent_and_lose_it(system, agent):
    proc, leftovers = agent
    agent_ref = await system.lookup("agent/n2")
    assert agent_ref is not None and agent_ref.address.startswith("tcp://127.0.0.2:")
    assert (await agent_ref.ask("info"))["pid"] == proc.pid

    echo, parent = await asyncio.gather(system.spawn(Echo, name="on-n2", where=agent_ref),
                                        system.spawn(Parent, agent_ref))
    assert echo.address.startswith("tcp://127.0.0.2:")
    pid = await echo.ask("pid")
    leftovers.append(pid)
    assert pid in [c.pid for c in _children(proc.pid)]  # the agent is its OS parent
    assert await (await system.lookup("on-n2")).ask("echo", "hi") == "hi"

    # A supervised child on the agent's node is restarted through the agent.
    [child] = await parent.ask("kids")
    assert child.address.startswith("tcp://127.0.0.2:")
    first_pid = await child.ask("pid")
    leftovers.append(first_pid)
    os.kill(first_pid, signal.SIGKILL)

    async def restarted():
        try:
            return await child.ask("pid", timeout=5) != first_pid
        except (ActorDeadError, UnknownActorError):  # dead, or its process not ready yet
            return False
    await eventually(restarted, timeout=30, what="the child's restart through the agent")
    leftovers.append(await child.ask("pid"))

    # The agent dies: its children go with it, and calls to them fail as dead.
    watcher = await system.spawn(Watcher)
    await watcher.ask("watch_ref", parent)
    await watcher.ask("watch_ref", echo)
    proc.kill()
    await eventually(lambda: not pid_alive(pid), timeout=15, what="the echo process to exit")
    started = time.monotonic()
    with pytest.raises(ActorDeadError):
        await echo.ask("echo", "anyone?", timeout=20)
    assert time.monotonic() - started < 10
    # The supervisor cannot restart its child without the agent: it runs out of restarts
    # (2 within 30 s, one of them used above) and escalates; its watcher hears of it.
    async def both_told():
        found = await watcher.ask("notices")
        return {who: reason for who, reason, _ in found} if len(found) == 2 else None
    told = await eventually(both_told, timeout=20, what="the parent to give up")
    assert "EscalationError" in told[parent.actor_id]
    assert "stopped" not in told[echo.actor_id], "the agent's death passed for a normal stop"
