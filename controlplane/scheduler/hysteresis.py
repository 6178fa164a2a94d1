"""Placement moves per minute: the hysteresis across rounds (``PlacementConfig.max_moves`` caps one round).

A round runs every ``interval_s`` (0.5 s), so a per-round cap alone allows hundreds of optional
moves a minute, each an adapter load on a worker that is serving: demand estimates that wobble
then move replicas back and forth. The budget grows with the cluster (moves per worker per minute)
and counts only optional moves: re-placing a dead or draining worker's functions and placing new
functions are never held back, and the loop lifts the limit while a worker joins (giving it its
share is membership, not churn). Pure state: the caller passes the time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class MoveBudget:
    per_worker_per_minute: float
    window_s: float = 60.0
    _spent: deque[tuple[float, int]] = field(default_factory=deque)

    def available(self, now: float, workers: int) -> int:
        """Optional moves the next round may make: the window's limit less what it already spent."""
        while self._spent and now - self._spent[0][0] >= self.window_s:
            self._spent.popleft()
        limit = math.ceil(self.per_worker_per_minute * max(workers, 1) * self.window_s / 60.0)
        return max(0, limit - sum(n for _, n in self._spent))

    def spend(self, now: float, moves: int) -> None:
        if moves > 0:
            self._spent.append((now, moves))
