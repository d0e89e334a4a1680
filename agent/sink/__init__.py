"""Where events go: a JSON Lines file, the local store, or an ingest endpoint behind a durable spool.

Every sink takes events as JSON Lines: one structured-mode CloudEvent per line, each line ending in `\n`,
the bytes the pipeline (the core) produces and that will be written or sent. A sink passes them on without
re-encoding, and parses only what it must, so a sink never needs to know how an event was built.
"""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    def write(self, lines: bytes) -> None:
        """Accept events as JSON Lines (possibly none: `b""`); a sink may batch them, but must not lose them
        once this returns."""

    def close(self) -> None:
        """Deliver or persist everything accepted so far, then release resources."""

    def counters(self) -> dict[str, int]:
        """What the sink did, for the summary line (empty when there is nothing to say)."""


def split_lines(lines: bytes) -> list[bytes]:
    """The lines of JSON Lines, without their newlines (a last line that lacks one still counts)."""
    parts = lines.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    return parts
