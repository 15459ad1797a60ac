"""One message at a time by default; up to ``max_concurrency`` at once when raised."""

from __future__ import annotations

import asyncio

from .sample_actors import SerialSleeper, Sleeper


def most_at_once(log: list) -> int:
    running = peak = 0
    for event, _ in log:
        running += 1 if event == "started" else -1
        peak = max(peak, running)
    return peak


async def test_methods_run_one_at_a_time_by_default(system):
    sleeper = await system.spawn(SerialSleeper)
    await asyncio.gather(*(sleeper.ask("nap", 0.05, f"n{i}") for i in range(5)))
    log = await sleeper.ask("log")
    assert most_at_once(log) == 1
    assert log == [[event, f"n{i}"] for i in range(5) for event in ("started", "finished")]


async def test_max_concurrency_lets_that_many_run_at_once(system):
    sleeper = await system.spawn(Sleeper)  # max_concurrency = 4
    await asyncio.gather(*(sleeper.ask("nap", 0.2, f"n{i}") for i in range(10)))
    log = await sleeper.ask("log")
    assert most_at_once(log) == Sleeper.max_concurrency
    # They start in the order they were sent.
    assert [tag for event, tag in log if event == "started"] == [f"n{i}" for i in range(10)]
