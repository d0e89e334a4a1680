"""`/healthz` and `/readyz`: what a supervisor (systemd, a kubelet) asks before restarting the agent or counting on it.

Alive: every capture loop is running and has reported lately (a loop that stopped reporting is stuck),
and no stop was asked for. Ready: alive, and also every table loaded once (events wait for the credential
table until then), and the spool below 90% of `--spool-max-bytes` (past that, a slow endpoint is about
to cost events).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.observe.exposition import stalest_tables
from agent.observe.status import LiveStatus
from agent.sink import Sink
from agent.sink.ingest import IngestSink

SILENT_LIMIT = 30.0     # seconds without a report after which a capture loop counts as stuck (it reports each second)
SPOOL_READY_LIMIT = 0.9


@dataclass(frozen=True)
class Verdict:
    reasons: list[str] = field(default_factory=list)  # why not; empty when all is well

    @property
    def ok(self) -> bool:
        return not self.reasons

    def body(self) -> dict:
        return {"status": "ok"} if self.ok else {"status": "unavailable", "reasons": self.reasons}


class Health:
    def __init__(self, status: LiveStatus, sink: Sink, stopping: Callable[[], bool]) -> None:
        self.status = status
        self.sink = sink
        self.stopping = stopping

    def liveness(self) -> Verdict:
        if self.stopping():
            return Verdict(["stopping"])
        seen = self.status.workers_seen()
        reasons = []
        for worker in range(1, self.status.workers + 1):
            view = seen.get(worker)
            label = "capture" if self.status.workers == 1 else f"worker {worker}"
            if view is None:
                reasons.append(f"{label} not started yet")
            elif view.silent_for > SILENT_LIMIT:
                reasons.append(f"{label} has not reported for {view.silent_for:.0f} s")
        return Verdict(reasons)

    def readiness(self) -> Verdict:
        reasons = list(self.liveness().reasons)
        for name, table in stalest_tables(self.status).items():
            if table["loaded_at"] is None:
                reasons.append(f"{name} table not loaded yet")
        if isinstance(self.sink, IngestSink):
            spool = self.sink.spool_status()
            if spool.bytes_used >= SPOOL_READY_LIMIT * spool.max_bytes:
                reasons.append(f"spool {spool.bytes_used / spool.max_bytes:.0%} full"
                               f" ({spool.bytes_used} of {spool.max_bytes} bytes)")
        return Verdict(reasons)
