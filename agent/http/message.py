"""What the parser knows of one HTTP message: its head and how many bytes it took on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Message:
    start_time: float
    position: int                 # stream position of the message's first byte
    peer_acked: int = -1          # peer stream position acknowledged when it began (-1: unknown)
    end_time: float = 0.0
    size: int = 0                 # bytes on the wire: start line, headers, body with its framing
    head_end: int = 0             # stream position just past the head
    method: str = ""              # requests
    target: str = ""
    version: str = ""
    status: int = 0               # responses
    headers: list[tuple[str, str]] = field(default_factory=list)  # (lower-case name, value), in order
    damaged: bool = False         # a gap fell inside the body: counted, sizes are what was sent

    def header(self, name: str) -> str | None:
        """First value of a header (`name` in lower case), as key-auth and Kong read it."""
        for header_name, value in self.headers:
            if header_name == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        return [value for header_name, value in self.headers if header_name == name]
