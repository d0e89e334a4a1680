"""When the previous run stopped capturing, kept in the data directory: the time between a stop and the next
start is not captured unless the ring was kept (`ring_store.py`), and this makes that time said rather
than silent. A start without a kept ring logs how long nothing was captured, or, when the previous run
never recorded its stop (it was killed), that its end is unknown.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("agent.live")

RECORD_NAME = "capture.json"


class CaptureRecord:
    """`directory`: the data directory, or None when the sink keeps no state (`--output`)."""

    def __init__(self, directory: Path | None) -> None:
        self.path = directory / RECORD_NAME if directory is not None else None

    def started(self, took_over_the_ring: bool) -> None:
        """Say what the previous run's record tells of the time since it stopped; then record this run."""
        if self.path is None:
            return
        previous = self._read()
        now = time.time()
        if previous is not None and not took_over_the_ring:
            stopped = previous.get("stopped")
            if isinstance(stopped, (int, float)) and stopped <= now:
                log.warning("nothing was captured for %.1f s, from the previous run's stop to this start: what the "
                            "gateway served then is not billed (a service manager with a file-descriptor store keeps "
                            "the ring across a restart: see the README)", now - stopped)
            elif stopped is None:
                log.warning("the previous run (pid %s) did not record its stop (it was killed): what the gateway "
                            "served from its end to this start is not billed, and how long that was is unknown",
                            previous.get("pid", "?"))
        self._write({"pid": os.getpid(), "started": now, "stopped": None})

    def stopped(self) -> None:
        if self.path is None:
            return
        previous = self._read() or {}
        self._write({**previous, "pid": os.getpid(), "stopped": time.time()})

    def _read(self) -> dict | None:
        assert self.path is not None
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("cannot read %s (%s); it is written anew", self.path, error)
            return None
        return record if isinstance(record, dict) else None

    def _write(self, record: dict) -> None:
        assert self.path is not None
        temporary = self.path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(record))
            os.replace(temporary, self.path)
        except OSError as error:
            log.warning("cannot write %s (%s): the next start cannot say how long nothing was captured",
                        self.path, error.strerror or error)
