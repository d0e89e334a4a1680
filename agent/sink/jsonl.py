"""JSON Lines sink: one structured-mode CloudEvent per line, to a file or standard output."""

from __future__ import annotations

import json
import sys
from typing import IO


class JsonLinesSink:
    def __init__(self, path: str) -> None:
        self._stream: IO[str] = sys.stdout if path == "-" else open(path, "w", encoding="utf-8")
        self._owns_stream = path != "-"

    def write(self, events: list[dict]) -> None:
        dumps = json.dumps
        self._stream.write("".join(dumps(event, separators=(",", ":")) + "\n" for event in events))

    def close(self) -> None:
        self._stream.flush()
        if self._owns_stream:
            self._stream.close()
