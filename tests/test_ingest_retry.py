"""Backoff and Retry-After: how long the agent waits before sending a failed batch again."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from agent.backoff import Backoff
from agent.sink.retry import MAX_RETRY_AFTER_SECONDS, parse_retry_after

NOW = datetime(2024, 5, 1, 10, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("header, seconds", [
    ("120", 120.0),
    ("0", None),  # no positive wait: the backoff applies, not an immediate retry
    ("Wed, 01 May 2024 10:00:30 GMT", 30.0),
    ("Wed, 01 May 2024 09:00:00 GMT", None),  # a date in the past: likewise
    ("86400", MAX_RETRY_AFTER_SECONDS),  # a server asking for a day is asked again sooner
    (None, None), ("", None), ("soon", None), ("-5", None), ("²", None),  # (a digit to str.isdigit)
])
def test_retry_after_is_read_as_seconds_or_a_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_backoff_doubles_up_to_its_cap_with_jitter_below_each_step() -> None:
    backoff = Backoff(initial=0.5, cap=30.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (60, 30.0)]:
        delays = {backoff.delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(delays) > 1  # jittered: agents recovering together do not retry in step
