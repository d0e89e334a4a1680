"""Events the ingest endpoint will never accept, kept with the reason instead of blocking the others.

One JSON object per line: `{"at": ..., "reason": ..., "status": ..., "title": ..., "detail": ...,
"event": {...}}` (`event` is the raw line as text when it is not valid JSON). Each write is fsynced:
dead-lettering is rare and is the only record left of that event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("agent.sink.deadletter")

LOGGED_ONE_BY_ONE = 10  # events logged each with its id; after that, a count every SUMMARY_SECONDS
SUMMARY_SECONDS = 10.0


class DeadLetterFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._lock = threading.Lock()  # the pipeline and the delivery thread both set events aside
        self._last_summary = 0.0

    def add(self, line: bytes, reason: str, *, status: int | None = None,
            title: str | None = None, detail: str | None = None) -> None:
        """Record one event (its JSON line) with why it was set aside; logged with its id, never with its
        content."""
        try:
            event = json.loads(line)
        except ValueError:
            event = line.decode("utf-8", "replace")
        record = {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "reason": reason}
        record.update({k: v for k, v in (("status", status), ("title", title), ("detail", detail)) if v})
        record["event"] = event
        line = json.dumps(record, separators=(",", ":"), default=repr) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode("utf-8", "backslashreplace"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self.count += 1
        event_id = event.get("id") if isinstance(event, dict) else None
        now = time.monotonic()
        if self.count <= LOGGED_ONE_BY_ONE:
            log.warning("dead-lettered event %r to %s: %s", event_id, self.path, reason)
        elif now - self._last_summary >= SUMMARY_SECONDS:  # an endpoint refusing everything: not a line each
            self._last_summary = now
            log.warning("%d events dead-lettered to %s so far; the latest: %s", self.count, self.path, reason)
