"""Custom verifiers that the reward tests name by import path; reward worker processes
import them from here."""

from __future__ import annotations

import asyncio
import os


async def async_exact(item, response: str) -> float:
    await asyncio.sleep(0.01)
    return float(response.strip() == item.answer)


def shouting(item, response: str) -> float:
    return float(response.isupper())


def broken(item, response: str) -> float:
    raise ValueError(f"cannot score {item.item_id}")


def dies_once(item, response: str) -> float:
    """Kills its own process the first time (per marker file), then scores 1.0."""
    marker = item.metadata["marker"]
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)
    return 1.0


async def hangs(item, response: str) -> float:
    await asyncio.sleep(60)
    return 1.0


def spaces(item, response: str) -> float:
    """A reward any model can learn from its own samples: the share of an 8-token reply's
    tokens that start a word (SmolLM2's vocabulary: a bit under half of its tokens)."""
    return min(1.0, response.count(" ") / 8)
