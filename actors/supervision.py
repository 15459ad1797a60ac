"""Supervision strategies: what a parent does when a child fails.

- ``one_for_one``: restart only the failed child.
- ``one_for_all``: stop every child, then restart them all (for children that only make
  sense together).

A parent restarts at most ``max_restarts`` times within any ``within`` seconds (counted
over all its children). One more failure inside that window escalates: the parent itself
fails with :class:`EscalationError`, and its own supervisor decides. A top-level actor that
fails for good is stopped, logged, and its watchers are told.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


class EscalationError(RuntimeError):
    """A child failed more often than its supervisor's strategy allows."""


@dataclass(frozen=True)
class SupervisorStrategy:
    kind: str = "one_for_one"
    max_restarts: int = 3
    within: float = 60.0

    def __post_init__(self):
        if self.kind not in ("one_for_one", "one_for_all"):
            raise ValueError(f"unknown supervision strategy {self.kind!r}: "
                             "use 'one_for_one' or 'one_for_all'")
        if self.max_restarts < 0 or self.within <= 0:
            raise ValueError("max_restarts must be >= 0 and within > 0")


class RestartBudget:
    """Sliding window of restart times for one supervisor."""

    def __init__(self, strategy: SupervisorStrategy, clock=time.monotonic):
        self.strategy = strategy
        self._clock = clock
        self._times: deque[float] = deque()

    def allow(self) -> bool:
        """Record a restart if the window allows one more; False means escalate."""
        now = self._clock()
        while self._times and now - self._times[0] > self.strategy.within:
            self._times.popleft()
        if len(self._times) >= self.strategy.max_restarts:
            return False
        self._times.append(now)
        return True
