"""The Prometheus families, made at each scrape from the live status and the sink (a `prometheus_client`
collector: nothing is counted twice, the data plane only reports once a second).

The summary line is the one list of counters: each of its counters becomes `agent_<name>_total`, except
the kinds of loss, which are one family, `agent_lost_total{reason=<name>}`, and the levels (the spool's
two, the TLS probes' processes), which are gauges. A counter the summary line gains later shows up here
by itself, as a kind of loss unless it is named in `NOT_LOSSES`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import orjson
import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.observe.status import LiveStatus
from agent.sink import Sink
from agent.sink.ingest import IngestSink

PREFIX = "agent_"
# Summary counters that count work done, not something lost; every other one is a kind of loss.
NOT_LOSSES = frozenset({
    "packets", "connections", "requests", "events", "kernel_packets",  # what was seen and metered
    "client_closed",                                                   # billed, with status 499
    "never_read",                                                      # the gateway logs none: not billed
    "duplicate_segments", "expired_connections",                       # handled as TCP says, nothing lost
    "gap_bytes",                                                       # the size of the `gaps`, in bytes
    "delivered", "retried", "stored", "duplicates",                    # what the sinks did
    "tls_chunks", "tls_streams",                                       # HTTPS plaintext read, its connections
    "tls_write_retries",                                               # a write the gateway made again
    "tls_unmetered",                                                   # a connection on a port not metered
    "after_stop",                                                      # begun after a stop: the next run's
})
# Summary values that are levels, not counts: the spool's, and the TLS probes' (status.LEVELS).
LEVELS = {"spooled_bytes": ("spool_bytes", "bytes the spool's files hold (events not yet acknowledged)"),
          "pending": ("spool_events", "events in the spool, not yet acknowledged by the ingest endpoint"),
          "tls_processes": ("tls_processes", "gateway processes the TLS probes are attached to"),
          "tls_library_read_processes": ("tls_library_read_processes", "of those, processes whose reads are "
                                         "probed in the TLS library (more probe hits) rather than nginx's own")}


class AgentCollector(Collector):
    def __init__(self, status: LiveStatus, sink: Sink, clock: Callable[[], float] = time.time) -> None:
        self.status = status
        self.sink = sink
        self._clock = clock
        self._cpu_by_pid: dict[int, float] = {}  # the agent's processes, those that ended too

    def collect(self) -> Iterator[Metric]:
        yield from self._summary_families({**self.status.totals(), **self.sink.counters()})
        yield from self._worker_families()
        yield from self._table_families()
        if isinstance(self.sink, IngestSink):
            yield from self._delivery_families(self.sink)
        yield from self._process_families()

    def _summary_families(self, counters: dict[str, int]) -> Iterator[Metric]:
        lost = CounterMetricFamily(PREFIX + "lost", "what was not metered or not delivered, by the summary line's"
                                                    " name for the kind of loss", labels=["reason"])
        for name, value in counters.items():
            if name in LEVELS:
                level, help_text = LEVELS[name]
                yield GaugeMetricFamily(PREFIX + level, help_text, value=value)
            elif name in NOT_LOSSES:
                yield CounterMetricFamily(PREFIX + name, f"the summary line's {name}", value=value)
            else:
                lost.add_metric([name], value)
        yield lost

    def _worker_families(self) -> Iterator[Metric]:
        drops = CounterMetricFamily(PREFIX + "worker_kernel_drops", "packets the kernel dropped, its ring full",
                                    labels=["worker"])
        fill = GaugeMetricFamily(PREFIX + "worker_ring_fill_ratio", "share of the ring's blocks waiting to be read",
                                 labels=["worker"])
        silent = GaugeMetricFamily(PREFIX + "worker_report_age_seconds", "seconds since the worker last reported",
                                   labels=["worker"])
        for worker, view in self.status.workers_seen().items():
            drops.add_metric([str(worker)], view.counters.get("kernel_drops", 0))
            fill.add_metric([str(worker)], view.ring_fill)
            silent.add_metric([str(worker)], view.silent_for)
        yield from (drops, fill, silent)

    def _table_families(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily(PREFIX + "table_entries", "entries of each lookup table (the stalest worker's)",
                                    labels=["table"])
        loaded = GaugeMetricFamily(PREFIX + "table_loaded", "1 once the table has loaded", labels=["table"])
        age = GaugeMetricFamily(PREFIX + "table_age_seconds", "seconds since the table's last good load",
                                labels=["table"])
        now = self._clock()
        for name, table in stalest_tables(self.status).items():
            entries.add_metric([name], table["entries"])
            loaded.add_metric([name], 0 if table["loaded_at"] is None else 1)
            if table["loaded_at"] is not None:
                age.add_metric([name], max(0.0, now - table["loaded_at"]))
        yield from (entries, loaded, age)

    def _delivery_families(self, sink: IngestSink) -> Iterator[Metric]:
        batches = CounterMetricFamily(PREFIX + "delivery_batches", "batches sent to the ingest endpoint, by its"
                                      " answer's status class (no_answer: no response)", labels=["status_class"])
        for status_class, count in sink.batches_by_status().items():
            batches.add_metric([status_class], count)
        yield batches
        spool = sink.spool_status()
        yield GaugeMetricFamily(PREFIX + "spool_limit_bytes", "--spool-max-bytes", value=spool.max_bytes)
        oldest = event_time(spool.oldest_event)
        age = GaugeMetricFamily(PREFIX + "spool_oldest_event_age_seconds", "age of the oldest event not yet"
                                " acknowledged (by its CloudEvents time); absent when the spool is empty")
        if oldest is not None:
            age.add_metric([], max(0.0, self._clock() - oldest))
        yield age

    def _process_families(self) -> Iterator[Metric]:
        """The parent and its capture workers (by the pids they report: no scan of every process)."""
        memory = 0
        for pid in {os.getpid(), *(view.pid for view in self.status.workers_seen().values())}:
            try:
                process = psutil.Process(pid)
                times = process.cpu_times()
                self._cpu_by_pid[pid] = times.user + times.system
                memory += process.memory_info().rss
            except psutil.Error:
                continue  # ended: what it used is kept
        yield CounterMetricFamily(PREFIX + "cpu_seconds", "CPU time of the agent's processes (parent and workers)",
                                  value=sum(self._cpu_by_pid.values()))
        yield GaugeMetricFamily(PREFIX + "resident_memory_bytes", "resident memory of the agent's processes"
                                " (the rings' pages included once touched)", value=memory)


def stalest_tables(status: LiveStatus) -> dict[str, dict]:
    """Each table as the worker with the oldest copy has it (a table not loaded by one worker is not loaded)."""
    tables: dict[str, dict] = {}
    for view in status.workers_seen().values():
        for name, table in view.tables.items():
            known = tables.get(name)
            if known is None or _older(table["loaded_at"], known["loaded_at"]):
                tables[name] = table
    return tables


def _older(loaded_at: float | None, than: float | None) -> bool:
    return than is not None and (loaded_at is None or loaded_at < than)


def event_time(line: bytes | None) -> float | None:
    """A spooled event's CloudEvents `time`, as a Unix time; None when there is none or it cannot be read."""
    if not line:
        return None
    try:
        stamp = orjson.loads(line).get("time")
        return datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else None
    except (orjson.JSONDecodeError, AttributeError, ValueError):
        return None
