"""How long to wait before sending a refused or failed batch again.

Exponential backoff with jitter, so that many agents recovering from one ingest outage do not all retry
in step; a server's `Retry-After` wins over the computed delay, because the server knows when it will
have room.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER_SECONDS = 600.0


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1: uniform in [d/2, d], d = min(cap, initial * 2**(n-1)) ("equal jitter")."""

    initial: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.initial * 2 ** min(attempt - 1, 32))
        return random.uniform(ceiling / 2, ceiling)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or HTTP-date), capped; None when absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
