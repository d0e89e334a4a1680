"""The checks OpenMeter's ingest applies to every event, done before an event is kept or sent.

An event that fails them would be refused with 400 by the ingest endpoint on every attempt, so it is set
aside at once (dead-lettered, or skipped by the store) instead of occupying the spool.
"""

from __future__ import annotations

import json

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


def encode_line(event: dict) -> bytes:
    """One compact JSON line (no newline); raises ValueError/TypeError for what JSON cannot carry."""
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode("ascii")
