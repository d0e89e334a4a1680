"""How long to wait before trying again (an ingest endpoint, the Admin API) after a failure.

Exponential backoff with jitter, so that many agents recovering from one outage do not all retry in step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1: uniform in [d/2, d], d = min(cap, initial * 2**(n-1)) ("equal jitter")."""

    initial: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, jitter: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap, self.initial * 2 ** min(attempt - 1, 32))
        return ceiling * (0.5 + 0.5 * jitter())
