"""Where events go: a JSON Lines file, the local store, or an ingest endpoint behind a durable spool.

Every sink takes events as structured-mode CloudEvent dicts (JSON-ready, `time` already a string),
the way they will be written or sent, so a sink never needs to know how an event was built.
"""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    def write(self, events: list[dict]) -> None:
        """Accept events; a sink may batch them, but must not lose them once this returns."""

    def close(self) -> None:
        """Deliver or persist everything accepted so far, then release resources."""

    def counters(self) -> dict[str, int]:
        """What the sink did, for the summary line (empty when there is nothing to say)."""
