"""A server's `Retry-After`: a positive one wins over the computed backoff (agent/backoff.py), because the
server knows when it will have room. One that asks for no wait (`0`, a date already past) is not followed:
retrying at once would hammer a server that is refusing for load."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER_SECONDS = 600.0


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or HTTP-date), capped; None when absent, invalid
    or not positive, so that the backoff applies."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # ("²" is a digit to str.isdigit, and not to float)
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return min(seconds, MAX_RETRY_AFTER_SECONDS) if seconds > 0 else None
