"""What the parser knows of one HTTP message: its head and how many bytes it took on the wire.

Headers are looked up in the raw head when asked for, not split up front: most messages are only
asked for two or three of them, and parsing every head in full was the pipeline's largest cost.
"""

from __future__ import annotations

import re

_HEADER_PATTERNS: dict[str, re.Pattern[bytes]] = {}


def _header_pattern(name: str) -> re.Pattern[bytes]:
    pattern = _HEADER_PATTERNS.get(name)
    if pattern is None:
        pattern = _HEADER_PATTERNS[name] = re.compile(
            rb"\n" + re.escape(name.encode("latin-1")) + rb"[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE
        )
    return pattern


class Message:
    __slots__ = ("start_time", "position", "peer_acked", "end_time", "size", "head_end", "head",
                 "method", "target", "version", "status")

    def __init__(self, start_time: float, position: int, peer_acked: int = -1) -> None:
        self.start_time = start_time
        self.position = position        # stream position of the message's first byte
        self.peer_acked = peer_acked    # peer stream position acknowledged when it began (-1: unknown)
        self.end_time = 0.0
        self.size = 0                   # bytes on the wire: start line, headers, body with its framing
        self.head_end = 0               # stream position just past the head
        self.head = b""                 # the raw head, start line included
        self.method = ""                # requests
        self.target = ""
        self.version = ""               # requests: nginx refuses a chunked body before HTTP/1.1
        self.status = 0                 # responses

    def header(self, name: str) -> str | None:
        """First value of a header (name case-insensitive), as key-auth and Kong read it."""
        found = _header_pattern(name).search(self.head)
        return found.group(1).strip().decode("latin-1") if found is not None else None
