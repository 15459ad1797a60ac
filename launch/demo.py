"""`asystem demo`: a tour of the actor runtime on this machine, with real processes.

It starts a supervised fleet of two worker processes, measures a cross-process ask,
streams tokens with flow control, crashes a worker and watches its supervisor restart it,
SIGKILLs the other and shows the death-watch notice, and shuts everything down.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from actors import ActorDeadError, ActorSystem, RemoteError

from .demo_actors import Fleet, Observer, Worker


async def _poll(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


async def demo() -> int:
    print("asystem actor runtime demo (the RL pipeline will replace this main job)\n")
    async with ActorSystem() as system:
        t0 = time.perf_counter()
        fleet = await system.spawn(Fleet, name="fleet", timeout=120)
        workers = await fleet.ask("workers")
        print(f"started a fleet of {len(workers)} worker processes in "
              f"{time.perf_counter() - t0:.1f}s: {', '.join(map(str, workers))}")
        w0, w1 = workers

        times = []
        for _ in range(500):
            start = time.perf_counter()
            await w0.ask("whoami", timeout=5)
            times.append(time.perf_counter() - start)
        print(f"cross-process ask round trip: median {statistics.median(times) * 1e6:.0f} us "
              f"over {len(times)} calls")

        start = time.perf_counter()
        tokens = [t async for t in w1.stream("generate", 200, window=16, timeout=5)]
        print(f"streamed {len(tokens)} tokens with a 16-item window in "
              f"{time.perf_counter() - start:.2f}s")

        pid = await w0.ask("whoami")
        try:
            await w0.ask("crash", timeout=5)
        except RemoteError as exc:
            print(f"worker-0 (pid {pid}) raised: {exc.remote_type}: {exc.remote_message}")
        new_pid = await _poll(lambda: _pid_if_changed(w0, pid), timeout=60)
        print(f"its supervisor restarted it under the same ref: new pid {new_pid}")

        observer = await system.spawn(Observer)
        await observer.ask("follow", w1)
        print("SIGKILL worker-1 while a call is in flight...")
        start = time.perf_counter()
        try:
            await w1.ask("kill", timeout=30)
        except ActorDeadError:
            print(f"  the call failed with ActorDeadError after "
                  f"{(time.perf_counter() - start) * 1e3:.0f} ms, not at its 30 s deadline")
        notices = await _poll(lambda: observer.ask("seen"), timeout=10)
        print(f"  death watch: {notices[0]}")
        await _poll(lambda: _alive(w1), timeout=60)
        print(f"  and worker-1 is back: pid {await w1.ask('whoami')}")
        print(f"\nruntime counters: {dict(system.stats())}")
    print("shut down cleanly")
    return 0


async def _pid_if_changed(ref, old: int):
    try:
        pid = await ref.ask("whoami", timeout=2)
    except (ActorDeadError, TimeoutError, Exception):
        return None
    return pid if pid != old else None


async def _alive(ref) -> bool:
    try:
        await ref.ask("whoami", timeout=2)
        return True
    except Exception:
        return False


__all__ = ["demo", "Worker"]
