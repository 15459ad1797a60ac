"""Actor classes the actor tests start, in this process or in child processes (which
import them from here)."""

from __future__ import annotations

import asyncio
import os
import signal

from actors import Actor, SupervisorStrategy


class Echo(Actor):
    async def echo(self, value):
        return value

    async def pid(self) -> int:
        return os.getpid()

    async def boom(self, message: str = "boom"):
        raise ValueError(message)

    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    async def count(self, n: int, delay: float = 0.0):
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            yield i

    async def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Recorder(Actor):
    """Remembers what it was told, in order."""

    def __init__(self):
        self.seen: list = []

    async def record(self, value) -> None:
        self.seen.append(value)

    async def history(self) -> list:
        return self.seen


class Flaky(Actor):
    """Fails (crash_on_error) when asked to; counts its incarnations via a file."""

    crash_on_error = True

    def __init__(self, marker: str | None = None):
        self.marker = marker

    async def on_start(self) -> None:
        if self.marker:
            with open(self.marker, "a") as f:
                f.write("start\n")

    async def ping(self) -> str:
        return "pong"

    async def crash(self) -> None:
        raise RuntimeError("asked to crash")

    async def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Parent(Actor):
    supervisor_strategy = SupervisorStrategy("one_for_one", max_restarts=2, within=30.0)

    def __init__(self, where: str = "local", marker: str | None = None, n: int = 1):
        self.where, self.marker, self.n = where, marker, n

    async def on_start(self) -> None:
        for i in range(self.n):
            await self.spawn(Flaky, self.marker, name=None, where=self.where)

    async def kids(self) -> list:
        return list(self.children.values())


class Watcher(Actor):
    def __init__(self):
        self.terminated: list = []

    async def watch_ref(self, ref) -> None:
        self.watch(ref)

    async def on_terminated(self, ref, reason: str, failed: bool = True) -> None:
        self.terminated.append([ref.actor_id, reason, failed])

    async def notices(self) -> list:
        return self.terminated
