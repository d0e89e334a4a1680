"""`--workers N`: the kernel spreads flows over N rings in one fanout group, each read by a child process
with its own pipeline; the parent owns the sink, receives their events through pipes and sums their
counters into one summary."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from agent.credentials.sync import CredentialSync
from agent.live.capture import POLL_MS, StopFlag, capture, nothing, yield_cpu
from agent.live.cpu_share import catch_up_priority
from agent.observe.status import LiveStatus
from agent.options import pipeline_from_args
from agent.sink import Sink
from agent.source.packet_ring import PacketRing
from agent.workers import COUNTERS, receive, send_counters, send_events, send_progress, spawn

log = logging.getLogger("agent.live")

WORKER_EXIT_SECONDS = 8.5   # after forwarding a stop, the longest the parent waits for its workers


def run_workers(rings: list[PacketRing], args: argparse.Namespace, credentials: CredentialSync | None,
                stop: StopFlag, sink: Sink, capturing: Callable[[], None],
                status: LiveStatus | None = None) -> tuple[dict[str, int], bool]:
    """Each worker reports once a second through its pipe; with `status`, the reports go to it too.
    `capturing` runs once the workers have their rings."""

    def work(index: int, writer: Connection) -> int:
        for other in rings:
            if other is not rings[index]:
                other.close()
        return _worker(index + 1, rings[index], args, credentials, stop, writer)

    children = spawn(len(rings), work)
    # the parent yields along with its workers: it only has work when they do
    on_stop = yield_cpu(list(zip(children.values(), rings)), followers=(os.getpid(),)) if args.yield_cpu else nothing
    for ring in rings:
        ring.close()  # the workers' copies are the ones in use
    capturing()
    return _collect(children, stop, sink, on_stop, status)


def _worker(number: int, ring: PacketRing, args: argparse.Namespace, credentials: CredentialSync | None,
            stop: StopFlag, connection: Connection) -> int:
    """One worker's capture; its events, its report once a second (so a worker that dies still counts, up to
    its last second) and, last, its counters go to the parent as JSON."""

    on_stop = catch_up_priority if args.yield_cpu else nothing
    try:
        counters = capture(ring, pipeline_from_args(args, credentials), credentials, stop,
                           lambda events: send_events(connection, events), on_stop, label=f"worker {number}: ",
                           report=lambda report: send_progress(connection, report))
        send_counters(connection, counters)
    except (BrokenPipeError, ConnectionResetError):
        return 1  # the parent is gone
    return 0


def _collect(children: dict[Connection, int], stop: StopFlag, sink: Sink, on_stop: Callable[[], None],
             status: LiveStatus | None) -> tuple[dict[str, int], bool]:
    """Events to the sink as they come; counters summed; reports to `status`. A worker that fails stops
    them all."""
    numbers = {reader: number for number, reader in enumerate(children, 1)}
    totals: dict[str, int] = {}
    reported: set[Connection] = set()
    last_counts: dict[Connection, dict[str, int]] = {}  # each worker's counters as of its last report
    clean = True
    stopping_since: float | None = None
    while children:
        if stop.signal is not None and stopping_since is None:
            stopping_since = time.monotonic()
            on_stop()
            for pid in children.values():
                _signal(pid, signal.SIGTERM)
        if stopping_since is not None and time.monotonic() - stopping_since > WORKER_EXIT_SECONDS:
            log.error("%d workers did not finish in time; their last events are lost", len(children))
            for pid in children.values():
                _signal(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return totals, False
        for reader in wait(list(children), timeout=POLL_MS / 1000):
            assert isinstance(reader, Connection)
            try:
                message = reader.recv_bytes()
            except (EOFError, OSError):
                pid = children.pop(reader)
                reader.close()
                _, exit_status = os.waitpid(pid, 0)
                if reader not in reported and reader in last_counts:
                    # its counters as of its last report: what it did in its last second is not counted
                    for name, value in last_counts[reader].items():
                        totals[name] = totals.get(name, 0) + value
                if reader not in reported or os.waitstatus_to_exitcode(exit_status) != 0:
                    clean = False
                    if stop.signal is None:
                        log.error("a worker (pid %d) ended unexpectedly; stopping (its counters are as of its last"
                                  " report, at most a second before)", pid)
                        stop.signal = signal.SIGTERM
                continue

            def progress(report: dict, reader: Connection = reader) -> None:
                last_counts[reader] = report["counters"]
                if status is not None:
                    status.update(numbers[reader], report)

            events = receive(message, totals, progress)
            if events is not None:
                sink.write(events)
            elif message[:1] == COUNTERS:
                reported.add(reader)
    return totals, clean


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
