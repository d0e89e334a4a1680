"""When the previous run stopped capturing, kept in the data directory: the time between a stop and the next
start is not captured unless the ring was kept (`ring_store.py`), and this makes that time said rather
than silent. A start without a kept ring, or with `--tls-port` (the TLS probes are not kept), logs how long
nothing (or no HTTPS) was captured, or, when the previous run never recorded its stop (it was killed), that
its end is unknown.
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

    def started(self, took_over_the_ring: bool, metering_tls: bool) -> None:
        """Say what the previous run's record tells of the time since it stopped; then record this run. A kept
        ring covers plain HTTP only: the TLS probes are attached anew at each start (`--tls-port`)."""
        if self.path is None:
            return
        previous = self._read()
        now = time.time()
        if previous is not None and (not took_over_the_ring or metering_tls):
            what = "nothing was captured" if not took_over_the_ring else "no HTTPS (--tls-port) was captured"
            why = ("a service manager with a file-descriptor store keeps the ring across a restart: see the README"
                   if not took_over_the_ring else
                   "the ring was kept, but the TLS probes are attached anew at each start")
            stopped = previous.get("stopped")
            if isinstance(stopped, (int, float)) and stopped <= now:
                log.warning("%s for %.1f s, from the previous run's stop to this start: what the gateway served then "
                            "is not billed (%s)", what, now - stopped, why)
            elif stopped is None:
                log.warning("the previous run (pid %s) did not record its stop (it was killed): %s from its end to "
                            "this start, so what the gateway served then is not billed, and how long that was is "
                            "unknown (%s)", previous.get("pid", "?"), what, why)
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
