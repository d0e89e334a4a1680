"""Live mode: meter a running gateway from the kernel's packet ring until SIGINT or SIGTERM.

At a stop signal the rings stop filling, what they already hold is read, the connections still open are
closed out (an answered request is emitted; one still waiting is emitted as replay emits it), every event
reaches the sink and the summary line is printed, well within 10 seconds.

With `--workers N` the kernel spreads flows over N child processes (fanout by flow hash), each with its
own ring and pipeline; the parent owns the sink, receives their events through pipes and sums their
counters into one summary. Unless `--no-yield-cpu`, the capture runs at idle priority while its ring has
room (see `source/cpu_share.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait

from agent.credentials.sync import CredentialSync
from agent.options import pipeline_from_args
from agent.pipeline import Pipeline, summary_line, tune_garbage_collector
from agent.sink import Sink
from agent.source.cpu_share import allow_return_after_privilege_drop, catch_up_priority, start_watcher, stop_watcher
from agent.source.kernel_filter import MAX_PORTS, capture_filter
from agent.source.packet_ring import PacketRing
from agent.source.privileges import drop_privileges, user_entry
from agent.source.startup_checks import (Link, LiveCaptureError, check_ring_memory, interface_link, report_listeners,
                                         socket_error)
from agent.workers import fork, receive, send_counters, send_events

log = logging.getLogger("agent.live")

POLL_MS = 100               # longest wait for a block: how quickly a stop signal is noticed
HOUSEKEEPING_SECONDS = 1.0  # kernel counters read; on a quiet interface, timeouts and idle expiry run
DRAIN_SECONDS = 6.0         # after a stop signal, the longest spent reading what the ring still holds
WORKER_EXIT_SECONDS = 8.5   # after forwarding a stop, the longest the parent waits for its workers

Emit = Callable[[list[dict]], None]


class StopFlag:
    """The signal handler: records the first stop signal; the capture loop looks at it between blocks."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signum


def run_live(args: argparse.Namespace, credentials: CredentialSync | None, sink: Sink) -> int:
    """Capture until stopped; 0 when every worker finished cleanly, 1 otherwise."""
    ports = set(args.port or [8000])
    if len(ports) > MAX_PORTS:
        raise LiveCaptureError(f"at most {MAX_PORTS} --port values can be captured")
    link = interface_link(args.iface)
    pipeline = pipeline_from_args(args, credentials)  # bad metering flags fail before anything is opened
    check_ring_memory(args.ring_mb << 20, args.workers)
    if args.user:
        user_entry(args.user)
    rings = open_rings(link, ports, args.workers, args.ring_mb << 20)
    try:
        report_listeners(ports)
        if args.user:
            if args.yield_cpu:
                allow_return_after_privilege_drop()
            drop_privileges(args.user)
    except BaseException:
        for ring in rings:
            ring.close()
        raise
    stop = StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    where = (f"capturing on {link.interface} (ports {', '.join(map(str, sorted(ports)))}; "
             f"{len(rings)} x {rings[0].ring_bytes >> 20} MiB ring)")
    if len(rings) == 1:
        on_stop = _yield_cpu([(os.getpid(), rings[0])]) if args.yield_cpu else _nothing
        log.info("%s", where)
        counters = capture(rings[0], pipeline, credentials, stop, sink.write, on_stop)
        rings[0].close()
        clean = True
    else:
        counters, clean = run_workers(rings, args, credentials, stop, sink, where)
    sink.close()  # in live capture a spool is not waited for: what it holds is sent at the next start
    delivery = sink.counters() if hasattr(sink, "counters") else {}
    print(summary_line({**counters, **delivery}), file=sys.stderr)
    return 0 if clean else 1


def open_rings(link: Link, ports: set[int], workers: int, ring_bytes: int) -> list[PacketRing]:
    """One ring per worker, all in one fanout group; opened before any privilege is dropped."""
    program = capture_filter(ports, link.header_length, drop_outgoing=link.loopback)
    rings: list[PacketRing] = []
    try:
        for _ in range(workers):
            first = rings[0] if rings else None
            rings.append(PacketRing(
                link.interface, link.linktype, program, ring_bytes,
                fanout_group=first.fanout_group if first else None,
                ignore_outgoing=first.ignores_outgoing if first else link.loopback))
    except OSError as error:
        for ring in rings:
            ring.close()
        raise socket_error(link.interface, error) from None
    return rings


def _yield_cpu(targets: list[tuple[int, PacketRing]], followers: tuple[int, ...] = ()) -> Callable[[], None]:
    """Start the CPU-share watcher; returns what the calling thread does at a stop: end the watcher and
    take priority, since what the ring holds must be read before the deadline."""
    watcher = start_watcher(targets, followers)

    def on_stop() -> None:
        stop_watcher(watcher)
        catch_up_priority()

    return on_stop


def _nothing() -> None:
    pass


def capture(ring: PacketRing, pipeline: Pipeline, credentials: CredentialSync | None, stop: StopFlag,
            emit: Emit, on_stop: Callable[[], None], label: str = "") -> dict[str, int]:
    """Ring -> pipeline -> `emit(events)` until stopped, then drain and close out; returns the counters."""
    tune_garbage_collector()
    if credentials is not None:
        credentials.start()  # a first load that fails is retried; events wait for the table meanwhile
    try:
        next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
        truncated = 0
        while stop.signal is None:
            frames = ring.next_block()
            if frames is not None:
                events = pipeline.feed(frames)
                if events:
                    emit(events)
            else:
                ring.wait(POLL_MS)
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                truncated = _watch_kernel(ring, label, truncated)
                if frames is None:  # caught up: let time pass, so timeouts and idle expiry still happen
                    events = pipeline.tick(time.time())
                    if events:
                        emit(events)
        on_stop()
        unread = _drain(ring, pipeline, emit, time.monotonic() + DRAIN_SECONDS, label)
        events = pipeline.finish()
        if events:
            emit(events)
    finally:
        if credentials is not None:
            credentials.stop()
    ring.read_statistics()
    if pipeline.meter.counters.held:
        log.warning("%s%d requests were still waiting for the credential table and are not metered",
                    label, pipeline.meter.counters.held)
    counters = pipeline.counters()
    counters["corrupt_packets"] += ring.truncated
    counters["kernel_packets"] = ring.statistics.packets
    counters["kernel_drops"] = ring.statistics.drops
    counters["unread_packets"] = unread
    return counters


def _drain(ring: PacketRing, pipeline: Pipeline, emit: Emit, deadline: float, label: str) -> int:
    """Read what the ring holds once no more comes in; returns the packets left unread at the deadline."""
    ring.stop_capturing()
    settled = time.monotonic() + 2 * ring.retire_ms / 1000  # by then the block being filled is handed over
    while True:
        frames = ring.next_block()
        if frames is None:
            remaining = settled - time.monotonic()
            if remaining <= 0:
                return 0
            ring.wait(max(1, int(remaining * 1000)))
            continue
        events = pipeline.feed(frames)
        if events:
            emit(events)
        if time.monotonic() > deadline:
            unread = ring.pending_packets()
            if unread:
                log.warning("%sstopping with %d captured packets still unread (the agent was behind)", label, unread)
            return unread


def _watch_kernel(ring: PacketRing, label: str, truncated_before: int) -> int:
    """Log when the kernel's drop counter or the count of cut frames moves; returns the latter."""
    delta = ring.read_statistics()
    if delta.drops:
        log.warning("%sthe kernel dropped %d packets in the last second, the ring being full (%d in all); "
                    "a larger --ring-mb or more --workers helps", label, delta.drops, ring.statistics.drops)
    if ring.truncated != truncated_before:
        log.warning("%s%d frames larger than a ring block were cut (counted as corrupt)", label, ring.truncated)
    return ring.truncated


# -- several workers -----------------------------------------------------------------------------------


def run_workers(rings: list[PacketRing], args: argparse.Namespace, credentials: CredentialSync | None,
                stop: StopFlag, sink: Sink, where: str) -> tuple[dict[str, int], bool]:
    children: dict[Connection, int] = {}
    for index, ring in enumerate(rings):
        reader, writer = Pipe(duplex=False)
        earlier = list(children)

        def work(index: int = index, ring: PacketRing = ring, writer: Connection = writer,
                 reader: Connection = reader, earlier: list[Connection] = earlier) -> int:
            reader.close()
            for connection in earlier:
                connection.close()
            for other in rings:
                if other is not ring:
                    other.close()
            return _worker(index + 1, ring, args, credentials, stop, writer)

        pid = fork(work)
        writer.close()
        children[reader] = pid
    # the parent yields along with its workers: it only has work when they do
    on_stop = _yield_cpu(list(zip(children.values(), rings)), followers=(os.getpid(),)) if args.yield_cpu else _nothing
    for ring in rings:
        ring.close()  # the workers' copies are the ones in use
    log.info("%s", where)
    return _collect(children, stop, sink, on_stop)


def _worker(number: int, ring: PacketRing, args: argparse.Namespace, credentials: CredentialSync | None,
            stop: StopFlag, connection: Connection) -> int:
    """One worker's capture; its events and, last, its counters go to the parent as JSON."""

    on_stop = catch_up_priority if args.yield_cpu else _nothing
    try:
        counters = capture(ring, pipeline_from_args(args, credentials), credentials, stop,
                           lambda events: send_events(connection, events), on_stop, label=f"worker {number}: ")
        send_counters(connection, counters)
    except (BrokenPipeError, ConnectionResetError):
        return 1  # the parent is gone
    return 0


def _collect(children: dict[Connection, int], stop: StopFlag, sink: Sink,
             on_stop: Callable[[], None]) -> tuple[dict[str, int], bool]:
    """Events to the sink as they come; counters summed. A worker that fails stops them all."""
    totals: dict[str, int] = {}
    reported: set[Connection] = set()
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
                _, status = os.waitpid(pid, 0)
                if reader not in reported or os.waitstatus_to_exitcode(status) != 0:
                    clean = False
                    if stop.signal is None:
                        log.error("a worker (pid %d) ended unexpectedly; stopping", pid)
                        stop.signal = signal.SIGTERM
                continue
            events = receive(message, totals)
            if events is not None:
                sink.write(events)
            else:
                reported.add(reader)
    return totals, clean


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
