"""Shared fixtures of the actor tests: one ActorSystem per test, and the check that a test
leaves no process behind."""

from __future__ import annotations

import asyncio
import inspect
import os
import time

import psutil
import pytest
import pytest_asyncio

from actors import ActorSystem
from transport.endpoint import Heartbeat

# Every actor test is bounded; a hang is a failure, not a stuck CI job.
TEST_TIMEOUT = 60
# Heartbeats a little faster than the default, so that a silent peer is noticed sooner.
HEARTBEAT = Heartbeat(interval=0.5, timeout=3.0)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


def live_descendants() -> list[psutil.Process]:
    """Processes below this one that are still running (zombies not yet reaped count too),
    except multiprocessing's resource tracker: started with the first process that
    multiprocessing spawns here (vLLM's engine core, in an earlier test of this session),
    it lives as long as this process by design."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if _RESOURCE_TRACKER in " ".join(proc.cmdline()):
                continue
        except psutil.ZombieProcess:  # its command line is gone; it counts
            pass
        except psutil.Error:  # gone, or not ours to read
            continue
        found.append(proc)
    return found


_RESOURCE_TRACKER = "multiprocessing.resource_tracker import main"


def describe(procs) -> str:
    parts = []
    for proc in procs:
        try:
            parts.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            parts.append(f"{proc.pid} (gone)")
    return "; ".join(parts)


async def eventually(check, timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    """Poll ``check`` (a function, sync or async) until it returns something truthy; return
    that. Fails the test, saying ``what`` was awaited, if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        await asyncio.sleep(interval)


async def assert_no_descendants(timeout: float = 10.0) -> None:
    """Every process this test started is gone (polled, since reaping takes a moment)."""
    deadline = time.monotonic() + timeout
    while live_descendants() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = live_descendants()
    for proc in left:  # do not let one test's leak fail the next ones too
        try:
            proc.kill()
        except psutil.Error:
            pass
    assert not left, f"processes left behind: {describe(left)}"


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def new_system(**kwargs) -> ActorSystem:
    # Generous: a child process start imports torch, which a loaded CI host may take long for.
    kwargs.setdefault("default_timeout", 45.0)
    kwargs.setdefault("heartbeat", HEARTBEAT)
    return ActorSystem(**kwargs)


@pytest_asyncio.fixture
async def system():
    """A started ActorSystem in the test's loop; shut down afterwards, and the test fails
    if any process it started outlives it."""
    sys_ = await new_system().start()
    try:
        yield sys_
    finally:
        async with asyncio.timeout(30):  # shutting down must never hang
            await sys_.shutdown()
    await assert_no_descendants()


@pytest.fixture
def pythonpath() -> str:
    """PYTHONPATH for scripts and agents this test starts: the repository root first."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
