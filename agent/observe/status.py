"""What the capture loops report while they run, gathered in the parent for the metrics and health endpoints.

Each capture loop (the one of a single process, or each `--workers` child through its pipe) reports once a
second: the counters of the summary line as they stand, how full its ring is, and its tables' status.
The parent keeps the latest report of each worker and sums the counters so that a total never goes down:
a worker whose counters fall (it restarted, and counts from zero again) has what it had counted before
kept as a base under its new counts. A few values of the summary line are levels, not counts (how many
gateway processes the TLS probes are attached to now): they fall without a restart, and are kept as
reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

from agent.observe.tables import TableStatus


# Summary values that say how things stand now, not how many happened: the latest is kept, never summed
# over a restart, and one falling is no sign of a restart (old workers exit after a gateway's reload).
LEVELS = frozenset({"tls_processes", "tls_library_read_processes"})


class Report(TypedDict):
    """One capture loop's report (JSON, so that a worker can send it through its pipe)."""

    counters: dict[str, int]
    ring_fill: float
    tables: dict[str, TableStatus]
    pid: int


@dataclass
class WorkerState:
    counters: dict[str, int] = field(default_factory=dict)  # what the worker has counted, restarts included
    last: dict[str, int] = field(default_factory=dict)      # its latest report's counters, as reported
    ring_fill: float = 0.0
    tables: dict[str, TableStatus] = field(default_factory=dict)
    pid: int = 0
    reported_at: float = 0.0                                 # monotonic


class LiveStatus:
    """Thread-safe: capture loops (or the parent's pipe reader) update, the HTTP server's threads read."""

    def __init__(self, workers: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[int, WorkerState] = {}
        self.stopping = False

    def update(self, worker: int, report: Report) -> None:
        """Worker `worker` (1..workers) reports."""
        with self._lock:
            state = self._states.setdefault(worker, WorkerState())
            restarted = any(value < state.last.get(name, 0) for name, value in report["counters"].items()
                            if name not in LEVELS)
            for name, value in report["counters"].items():
                if name in LEVELS:
                    state.counters[name] = value
                    continue
                before = state.last.get(name, 0)
                state.counters[name] = state.counters.get(name, 0) + (value if restarted else value - before)
            state.last = dict(report["counters"])
            state.ring_fill = report["ring_fill"]
            state.tables = report["tables"]
            state.pid = report["pid"]
            state.reported_at = self._clock()

    def totals(self) -> dict[str, int]:
        """The workers' counters summed, in the order the summary line has them."""
        totals: dict[str, int] = {}
        with self._lock:
            for state in self._states.values():
                for name, value in state.counters.items():
                    totals[name] = totals.get(name, 0) + value
        return totals

    def workers_seen(self) -> dict[int, WorkerView]:
        """Each worker that has reported, by number."""
        now = self._clock()
        with self._lock:
            return {worker: WorkerView(dict(state.counters), state.ring_fill, dict(state.tables), state.pid,
                                       now - state.reported_at)
                    for worker, state in sorted(self._states.items())}


@dataclass(frozen=True)
class WorkerView:
    counters: dict[str, int]
    ring_fill: float
    tables: dict[str, TableStatus]
    pid: int
    silent_for: float  # seconds since its last report
