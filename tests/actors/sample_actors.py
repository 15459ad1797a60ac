"""Actor classes the actor tests start, in this process or in child processes (which
import them from here)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
import uuid

import psutil
import torch

from actors import Actor, ActorError, SupervisorStrategy


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

    async def count_then_fail(self, n: int):
        for i in range(n):
            yield i
        raise KeyError(f"no item {n}")

    async def add(self, a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    async def unencodable(self):
        return {1, 2}  # a set: msgpack has no such type

    async def call(self, ref, method: str, *args):
        """Ask ``ref`` (a ref that arrived inside this message) and return its answer."""
        return await ref.ask(method, *args, timeout=10)

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


class SlowRecorder(Recorder):
    """A Recorder with a small mailbox that takes a moment per message, so that senders
    outrun it and wait for room."""

    mailbox_size = 4

    async def record(self, value) -> None:
        await asyncio.sleep(0.001)
        self.seen.append(value)


class Sender(Actor):
    """Sends a numbered sequence of tells (with an ask mixed in every ``ask_every``) to
    another actor: a second, independent sender for ordering tests."""

    async def send(self, target, tag: str, n: int, ask_every: int = 0) -> int:
        for i in range(n):
            if ask_every and i % ask_every == 0:
                await target.ask("record", [tag, i], timeout=20)
            else:
                await target.tell("record", [tag, i], timeout=20)
        # A round trip behind the tells: once it is answered, every tell has been handled
        # (FIFO per sender), so whoever asks next sees them all.
        await target.ask("history", timeout=20)
        return n


class Sleeper(Actor):
    """Long calls that report how they ended: finished, or cancelled by the runtime."""

    max_concurrency = 4

    def __init__(self):
        self.events: list = []

    async def nap(self, seconds: float, tag: str = "nap") -> float:
        self.events.append(["started", tag])
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.events.append(["cancelled", tag])
            raise
        self.events.append(["finished", tag])
        return seconds

    async def log(self) -> list:
        return self.events


class SerialSleeper(Sleeper):
    """One call at a time: later calls queue in the mailbox."""

    max_concurrency = 1


class Producer(Actor):
    """A stream producer that records how far it got and whether its finally ran; other
    methods stay callable while a stream is open (max_concurrency > 1)."""

    max_concurrency = 4

    def __init__(self):
        self.produced = 0
        self.closed = False

    async def produce(self, n: int, delay: float = 0.0, stall_after: int | None = None):
        """Yield 0..n-1, ``delay`` apart; after ``stall_after`` items, hang."""
        self.produced, self.closed = 0, False
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                if i == stall_after:
                    await asyncio.Event().wait()
                self.produced = i + 1
                yield i
        finally:
            self.closed = True

    async def progress(self) -> dict:
        return {"produced": self.produced, "closed": self.closed}


class Consumer(Actor):
    """Consumes a stream from another actor: takes ``n`` items, then stops taking."""

    def __init__(self):
        self.taken: list = []

    async def take_then_stall(self, ref, method: str, n: int, *args) -> None:
        async for item in ref.stream(method, *args, window=2, timeout=60):
            self.taken.append(item)
            if len(self.taken) == n:
                await asyncio.Event().wait()

    async def items(self) -> list:
        return self.taken

    async def pid(self) -> int:
        return os.getpid()


class Slow(Actor):
    """A slow consumer with a small mailbox."""

    mailbox_size = 4

    def __init__(self):
        self.handled = 0

    async def work(self, seconds: float = 0.0, payload=None) -> int:
        if seconds:
            await asyncio.sleep(seconds)
        self.handled += 1
        return self.handled

    async def count(self) -> int:
        return self.handled


class Flooder(Actor):
    """Floods another actor with tells until one of them does not get through in time."""

    async def flood(self, target, n: int, payload_bytes: int, timeout: float) -> dict:
        payload = b"x" * payload_bytes
        started = time.monotonic()
        result = {"sent": n, "error": None, "message": ""}
        for i in range(n):
            try:
                await target.tell("work", 0.0, payload, timeout=timeout)
            except ActorError as exc:  # AskTimeout or MailboxFullError, expected
                result = {"sent": i, "error": type(exc).__name__, "message": str(exc)}
                break
        return {**result, "elapsed": time.monotonic() - started,
                "rss": psutil.Process().memory_info().rss}

    async def rss(self) -> int:
        return psutil.Process().memory_info().rss


class Flaky(Actor):
    """Fails (crash_on_error) when asked to; counts its incarnations via a file."""

    crash_on_error = True

    def __init__(self, marker: str | None = None):
        self.marker = marker
        self.id = uuid.uuid4().hex

    async def on_start(self) -> None:
        if self.marker:
            _append(self.marker, "start\n")

    async def ping(self) -> str:
        return "pong"

    async def incarnation(self) -> str:
        return self.id

    async def pid(self) -> int:
        return os.getpid()

    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    async def crash(self) -> None:
        raise RuntimeError("asked to crash")

    async def fail_soon(self, delay: float) -> None:
        """Fail from a background task after ``delay`` (the actor keeps serving until then)."""
        async def later():
            await asyncio.sleep(delay)
            raise RuntimeError("background task failed")
        self.create_task(later())

    async def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Parent(Actor):
    supervisor_strategy = SupervisorStrategy("one_for_one", max_restarts=2, within=30.0)

    def __init__(self, where: str = "local", marker: str | None = None, n: int = 1):
        self.where, self.marker, self.n = where, marker, n
        self.id = uuid.uuid4().hex

    async def on_start(self) -> None:
        for i in range(self.n):
            await self.spawn(Flaky, self.marker, name=None, where=self.where)

    async def kids(self) -> list:
        return list(self.children.values())

    async def incarnation(self) -> str:
        return self.id


class TeamParent(Parent):
    """Children that only make sense together: one failing restarts them all."""

    supervisor_strategy = SupervisorStrategy("one_for_all", max_restarts=2, within=30.0)


class GrandParent(Actor):
    """Supervises one Parent, which escalates when its child fails too often."""

    supervisor_strategy = SupervisorStrategy("one_for_one", max_restarts=3, within=30.0)

    async def on_start(self) -> None:
        await self.spawn(Parent)

    async def kids(self) -> list:
        return list(self.children.values())


class Watcher(Actor):
    def __init__(self):
        self.terminated: list = []

    async def watch_ref(self, ref) -> None:
        self.watch(ref)

    async def unwatch_ref(self, ref) -> None:
        self.unwatch(ref)

    async def on_terminated(self, ref, reason: str, failed: bool = True) -> None:
        self.terminated.append([ref.actor_id, reason, failed])

    async def notices(self) -> list:
        return self.terminated


class Finder(Actor):
    """Looks actors up by name from wherever it runs."""

    async def find(self, name: str):
        return await self.system.lookup(name, timeout=10)

    async def find_and_ask(self, name: str, method: str, *args):
        ref = await self.system.lookup(name, timeout=10)
        return None if ref is None else await ref.ask(method, *args, timeout=10)

    async def start_named(self, name: str):
        """Start a named Echo in this process (it registers with the cluster's head)."""
        return await self.spawn(Echo, name=name)


class Journal(Actor):
    """Writes what it was told to ``path`` when it stops (so a test can see the drain)."""

    def __init__(self, path: str, delay: float = 0.0):
        self.path, self.delay = path, delay
        self.seen: list = []

    async def record(self, value) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.seen.append(value)

    async def on_stop(self) -> None:
        _write(self.path, json.dumps(self.seen))


class SlowOnStop(Actor):
    """Takes ``seconds`` to clean up (more than a stop's usual timeout), then writes ``path``."""

    stop_timeout = 30.0

    def __init__(self, path: str, seconds: float):
        self.path, self.seconds = path, seconds

    async def ping(self) -> str:
        return "pong"

    async def on_stop(self) -> None:
        await asyncio.sleep(self.seconds)
        _write(self.path, "clean")


class StuckOnStop(Actor):
    """An actor whose on_stop never returns."""

    async def ping(self) -> str:
        return "pong"

    async def on_stop(self) -> None:
        await asyncio.Event().wait()


class Nest(Actor):
    """A process actor that starts its own process child (a grandchild of the test)."""

    async def on_start(self) -> None:
        await self.spawn(Echo, where="process")

    async def pids(self) -> list:
        kids = list(self.children.values())
        return [os.getpid(), *[await k.ask("pid", timeout=10) for k in kids]]


class Tensors(Actor):
    async def make(self, nbytes: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)

    async def digest(self, tensor: torch.Tensor) -> list:
        return [list(tensor.shape), str(tensor.dtype), sha256(tensor)]

    async def echo(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
