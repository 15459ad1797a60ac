"""Actors the demo runs in child processes (they must be importable by module path)."""

from __future__ import annotations

import asyncio
import os
import signal

from actors import Actor


class Worker(Actor):
    """A stand-in rollout worker: streams 'tokens', and can crash or be killed."""

    crash_on_error = True

    async def whoami(self) -> int:
        return os.getpid()

    async def generate(self, n_tokens: int, delay: float = 0.001):
        for i in range(n_tokens):
            await asyncio.sleep(delay)
            yield i

    async def crash(self) -> None:
        raise RuntimeError("simulated worker bug")

    async def kill(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Fleet(Actor):
    """Supervises two workers in their own processes (one_for_one, default limits)."""

    async def on_start(self) -> None:
        for i in range(2):
            await self.spawn(Worker, name=f"worker-{i}", where="process", timeout=60)

    async def workers(self) -> list:
        return list(self.children.values())


class Observer(Actor):
    """Collects death-watch notices."""

    def __init__(self):
        self.notices: list = []

    async def follow(self, ref) -> None:
        self.watch(ref)

    async def on_terminated(self, ref, reason: str) -> None:
        self.notices.append(f"{ref.name or ref.actor_id}: {reason}")

    async def seen(self) -> list:
        return self.notices
