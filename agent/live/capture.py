"""The capture loop of one ring: frames from the kernel through the pipeline to `emit`, until a stop signal;
then the ring is drained and the connections still open are closed out."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from agent.credentials.sync import CredentialSync
from agent.live.cpu_share import catch_up_priority, start_watcher, stop_watcher
from agent.live.ring_store import leave_answers, take_answers
from agent.live.tls import TlsCapture
from agent.observe.status import Report
from agent.observe.tables import table_statuses
from agent.pipeline import Pipeline
from agent.source.packet_ring import PacketRing

log = logging.getLogger("agent.live")

POLL_MS = 100               # longest wait for a block: how quickly a stop signal is noticed
HOUSEKEEPING_SECONDS = 1.0  # kernel counters read; on a quiet interface, timeouts and idle expiry run
DRAIN_SECONDS = 6.0         # after a stop signal, the longest spent reading what the ring still holds
BLOCKS_PER_CALL = 16        # ring blocks the core reads per call (their events are emitted together)
IN_FLIGHT_SECONDS = 2.0     # after a stop, the longest spent waiting for the answers of requests in flight
IN_FLIGHT_POLL_SECONDS = 0.005  # meanwhile, how often the ring is looked at for the next block

Emit = Callable[[bytes], None]  # events as JSON Lines
Reporter = Callable[[Report], None]  # monitoring: where the loop's counters go once a second


def nothing() -> None:
    pass


class StopFlag:
    """The signal handler: records the first stop signal; the capture loop looks at it between blocks.
    `on_first` runs at once on the first: a capture at idle priority takes priority there, not after the
    batch it is in, which it would finish at idle priority."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.on_first: Callable[[], None] = nothing

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signum
            self.on_first()


def yield_cpu(targets: list[tuple[int, PacketRing]], followers: tuple[int, ...] = ()) -> Callable[[], None]:
    """Start the CPU-share watcher; returns what the calling thread does at a stop: end the watcher and
    take priority, since what the ring holds must be read before the deadline."""
    watcher = start_watcher(targets, followers)

    def on_stop() -> None:
        stop_watcher(watcher)
        catch_up_priority()

    return on_stop


def capture(ring: PacketRing, pipeline: Pipeline, credentials: CredentialSync | None, stop: StopFlag,
            emit: Emit, on_stop: Callable[[], None], label: str = "", report: Reporter | None = None,
            tls: TlsCapture | None = None) -> dict[str, int]:
    """Ring -> pipeline -> `emit(events)` until stopped, then drain and close out; returns the counters.
    With `report`, what the summary line would say goes there too, at the start and once a second. With
    `tls`, the TLS probes' records go into the same pipeline, between ring blocks."""
    if credentials is not None:
        credentials.start()  # a first load that fails is retried; events wait for the table meanwhile
    if ring.taken_over:
        pipeline.expect_answers(take_answers(ring))
    try:
        if report is not None:
            report(_report(ring, pipeline, credentials, tls))
        next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
        truncated = 0
        while stop.signal is None:
            events, blocks = pipeline.feed_ring(ring.core_ring, BLOCKS_PER_CALL)
            if events:
                emit(events)
            if tls is not None:
                events, records = tls.feed(pipeline)
                if events:
                    emit(events)
                blocks += records
            if not blocks:
                ring.wait(POLL_MS)
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                truncated = _watch_kernel(ring, label, truncated)
                if tls is not None:
                    tls.warn(pipeline.counters())
                if report is not None:
                    report(_report(ring, pipeline, credentials, tls))
                if not blocks:  # caught up: let time pass, so timeouts and idle expiry still happen
                    events = pipeline.tick(time.time())
                    if events:
                        emit(events)
        on_stop()
        deadline = time.monotonic() + DRAIN_SECONDS  # for both rings: the stop stays within its promise
        unread = _drain(ring, pipeline, emit, deadline, label)
        if tls is not None:
            _drain_tls(tls, pipeline, emit, deadline)
        events = pipeline.finish()
        if events:
            emit(events)
        if tls is not None:
            tls.warn(pipeline.counters())
    finally:
        if credentials is not None:
            credentials.stop()
    ring.read_statistics()
    if pipeline.held:
        log.warning("%s%d requests were still waiting for the credential table and are not metered",
                    label, pipeline.held)
    return _counters(ring, pipeline, unread, tls)


def _counters(ring: PacketRing, pipeline: Pipeline, unread: int, tls: TlsCapture | None) -> dict[str, int]:
    """The summary line's counters of this capture (the kernel's as last read)."""
    counters = pipeline.counters()
    if tls is not None:
        counters.update(tls.counters())
    counters["corrupt_packets"] += ring.truncated
    counters["kernel_packets"] = ring.statistics.packets
    counters["kernel_drops"] = ring.statistics.drops
    counters["unread_packets"] = unread
    return counters


def _report(ring: PacketRing, pipeline: Pipeline, credentials: CredentialSync | None,
            tls: TlsCapture | None) -> Report:
    return {"counters": _counters(ring, pipeline, 0, tls), "ring_fill": ring.ready_fraction(),
            "tables": table_statuses(credentials), "pid": os.getpid()}


def _drain(ring: PacketRing, pipeline: Pipeline, emit: Emit, deadline: float, label: str) -> int:
    """Read every packet captured before the stop, then finish the requests in flight at it (see
    `_finish_in_flight`). Returns the packets captured before the stop and left unread at the deadline."""
    unread = _read_through_the_stop(ring, pipeline, emit, deadline, label)
    if not unread:
        _finish_in_flight(ring, pipeline, emit, deadline)
    return unread


def _finish_in_flight(ring: PacketRing, pipeline: Pipeline, emit: Emit, deadline: float) -> None:
    """The requests in flight at the stop get their answers: the ring is read on for up to
    IN_FLIGHT_SECONDS, but what is read there is left in it, for the next run that takes the ring over, and
    the requests that run will take are left to it (counted `after_stop`; `http/hand_over.rs` says which).
    So each request is billed once, with its answer when it came in time; the answers the next run will
    see to this run's requests are left with the ring (`leave_answers`). At most half the ring is read this
    way, so that the kernel keeps room to capture."""
    pipeline.leave_new_requests(resume=ring.kept_by_service_manager and ring.answers_fd is not None)
    ring.leave_read_blocks()
    until = min(deadline, time.monotonic() + IN_FLIGHT_SECONDS)
    room = ring.block_count // 2
    while room > 0 and pipeline.requests_in_flight() and time.monotonic() < until:
        events, blocks = pipeline.feed_ring(ring.core_ring, min(BLOCKS_PER_CALL, room))
        if events:
            emit(events)
        room -= blocks
        if not blocks:
            # (not ring.wait: with the blocks read left handed over, the kernel says the ring is readable)
            time.sleep(IN_FLIGHT_POLL_SECONDS)
    if ring.kept_by_service_manager:
        leave_answers(ring, pipeline.answers_owed())


def _read_through_the_stop(ring: PacketRing, pipeline: Pipeline, emit: Emit, deadline: float, label: str) -> int:
    """Through the block the kernel was filling at the stop, which it hands over within a retire period.
    The ring goes on filling meanwhile and is read here only up to a block boundary, so a successor that
    takes the ring over (`ring_store.py`) reads each packet this run did not, once."""
    last = ring.current_sequence()
    settled = time.monotonic() + 2 * ring.retire_ms / 1000  # a block with packets is handed over by then
    while not ring.read_through(last):
        events, blocks = pipeline.feed_ring(ring.core_ring, BLOCKS_PER_CALL)
        if events:
            emit(events)
        if not blocks:
            remaining = settled - time.monotonic()
            if remaining <= 0:
                return 0  # the block being filled was still empty: nothing was captured before the stop
            ring.wait(max(1, int(remaining * 1000)))
            continue
        if time.monotonic() > deadline:
            unread = ring.pending_packets()
            if unread and ring.kept_by_service_manager:
                log.warning("%sstopping with %d captured packets still unread (the agent was behind); the ring "
                            "stays with the service manager, and the next start reads them", label, unread)
            elif unread:
                log.warning("%sstopping with %d captured packets still unread (the agent was behind)", label, unread)
            return unread
    return 0


def _drain_tls(tls: TlsCapture, pipeline: Pipeline, emit: Emit, deadline: float) -> None:
    """What the TLS probes' ring still holds, until it is empty or the deadline passes (then what is left
    is counted as tls_unread_bytes and said)."""
    while True:
        events, records = tls.feed(pipeline)
        if events:
            emit(events)
        if not records:
            return
        if time.monotonic() > deadline:
            tls.unread_bytes = tls.backlog_bytes()
            log.warning("stopping with %d bytes of TLS records still unread (the agent was behind)", tls.unread_bytes)
            return


def _watch_kernel(ring: PacketRing, label: str, truncated_before: int) -> int:
    """Log when the kernel's drop counter or the count of cut frames moves; returns the latter."""
    delta = ring.read_statistics()
    if delta.drops:
        log.warning("%sthe kernel dropped %d packets in the last second, the ring being full (%d in all); "
                    "a larger --ring-mb or more --workers helps", label, delta.drops, ring.statistics.drops)
    if ring.truncated != truncated_before:
        log.warning("%s%d frames larger than a ring block were cut (counted as corrupt)", label, ring.truncated)
    return ring.truncated
