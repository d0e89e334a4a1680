"""The checks OpenMeter's ingest applies to every event, done before an event is kept or sent.

An event that fails them would be refused with 400 by the ingest endpoint on every attempt, so it is set
aside at once (dead-lettered, or skipped by the store) instead of being sent.
"""

from __future__ import annotations

import orjson

REQUIRED_ATTRIBUTES = ("id", "source", "specversion", "type", "subject")


def invalid_reason(event: object) -> str | None:
    """Why the ingest endpoint would refuse `event`, or None when it meets the contract's `Event` schema."""
    if not isinstance(event, dict):
        return "event is not a JSON object"
    for name in REQUIRED_ATTRIBUTES:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            return f"attribute {name!r} is missing or not a non-empty string"
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        return "'data' is not a JSON object"
    return None


def parse_line(line: bytes) -> tuple[object, str | None]:
    """One JSON Lines line (without its newline) as the event it holds, and why the endpoint would refuse it
    (None when it would not)."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc}"
    return event, invalid_reason(event)

