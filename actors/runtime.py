"""Running an asyncio program that hosts actors: uvloop when installed, clean Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import os
import sys


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when uvloop is installed (faster sockets and callbacks), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main):
    """Run the coroutine ``main`` to completion on a new loop (uvloop when available).

    Ctrl-C (SIGINT) cancels ``main``, so that its ``finally`` blocks and ``async with
    ActorSystem()`` exits run and shut everything down; a second Ctrl-C is not needed.
    Then the program exits with status 130 (as a shell reports Ctrl-C), without a
    traceback: SystemExit(130) instead of KeyboardInterrupt.
    """
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            return runner.run(main)
        except KeyboardInterrupt:
            raise SystemExit(130) from None


def configure_logging(level: str | None = None) -> None:
    """Log to stderr with the process id, at ASYSTEM_LOG_LEVEL (default WARNING)."""
    level = level or os.environ.get("ASYSTEM_LOG_LEVEL", "WARNING")
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
