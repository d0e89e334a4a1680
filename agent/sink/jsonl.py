"""JSON Lines sink: one structured-mode CloudEvent per line, to a file or standard output."""

from __future__ import annotations

import sys
from typing import IO


class JsonLinesSink:
    def __init__(self, path: str) -> None:
        self._stream: IO[bytes] = sys.stdout.buffer if path == "-" else open(path, "wb")
        self._owns_stream = path != "-"

    def write(self, lines: bytes) -> None:
        if lines:
            self._stream.write(lines)

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self._stream.flush()
        if self._owns_stream:
            self._stream.close()
