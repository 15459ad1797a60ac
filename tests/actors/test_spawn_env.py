"""A spawned process gets the environment variables its spawner asked for (a GPU pinned
with CUDA_VISIBLE_DEVICES, NCCL settings), on this host or through a node agent, and keeps
them when its supervisor restarts it; a node agent hands out ports free on its node."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import pytest

from actors import Actor, ActorDeadError, RemoteError, UnknownActorError

from .conftest import eventually


class EnvReader(Actor):
    async def env(self, name: str) -> str | None:
        return os.environ.get(name)

    async def pid(self) -> int:
        return os.getpid()


class PinnedParent(Actor):
    """Supervises one EnvReader pinned to 'GPU 3'."""

    async def on_start(self) -> None:
        await self.spawn(EnvReader, where="process", env={"CUDA_VISIBLE_DEVICES": "3"}, timeout=30)

    async def kid(self):
        return next(iter(self.children.values()))


async def test_env_reaches_the_process_and_survives_a_restart(system):
    reader = await system.spawn(EnvReader, where="process",
                                env={"CUDA_VISIBLE_DEVICES": "1", "NCCL_SOCKET_IFNAME": "lo"})
    assert await reader.ask("env", "CUDA_VISIBLE_DEVICES") == "1"
    assert await reader.ask("env", "NCCL_SOCKET_IFNAME") == "lo"
    assert await reader.ask("env", "PATH") == os.environ["PATH"], "the parent's environment is kept"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "1"

    parent = await system.spawn(PinnedParent)
    kid = await parent.ask("kid")
    first = await kid.ask("pid")
    os.kill(first, signal.SIGKILL)

    async def restarted():
        try:
            return await kid.ask("pid", timeout=5) != first
        except (ActorDeadError, UnknownActorError):
            return False
    await eventually(restarted, timeout=30, what="the child's restart")
    assert await kid.ask("env", "CUDA_VISIBLE_DEVICES") == "3"


@pytest.mark.parametrize("env", [{"A=B": "1"}, {"": "1"}, {"X": 1}, ["X"]])
async def test_a_bad_env_is_refused_before_anything_starts(system, env):
    with pytest.raises((TypeError, ValueError), match="env"):
        await system.spawn(EnvReader, where="process", env=env)


async def test_env_is_refused_for_a_local_actor(system):
    with pytest.raises(ValueError, match="new process"):
        await system.spawn(EnvReader, env={"X": "1"})


async def test_through_a_node_agent_env_and_free_ports(system, pythonpath):
    env = {**os.environ, "ASYSTEM_SECRET": system.secret.hex(), "PYTHONPATH": pythonpath}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.agent", "--bind", "tcp://127.0.0.2:0",
        "--head", system.address, "--node", "envnode", env=env, stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"node agent envnode" in line, line
        agent = await system.lookup("agent/envnode")
        reader = await system.spawn(EnvReader, where=agent, env={"CUDA_VISIBLE_DEVICES": "0,1"})
        assert reader.address.startswith("tcp://127.0.0.2:")
        assert await reader.ask("env", "CUDA_VISIBLE_DEVICES") == "0,1"

        # Bad input from the network gets a clear error, not a process.
        with pytest.raises(RemoteError, match="invalid variable name"):
            await agent.ask("start_actor", "tests.actors.test_spawn_env:EnvReader", [], {},
                            "bad-env", None, None, 10.0, {"A=B": "x"})

        ports = [await agent.ask("free_port") for _ in range(20)]
        assert len(set(ports)) == len(ports), "a port was handed out twice"
        with socket.socket() as sock:  # and it is really free
            sock.bind(("", ports[-1]))
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
