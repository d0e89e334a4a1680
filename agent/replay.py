"""Replay mode: a capture file through the pipeline into a sink (for tests and for backfilling usage).

With `--workers N`, N processes each read the whole file but handle only the connections dealt to them
(every connection stays in one process, as in live capture); the parent collects their events into the
one sink and sums their counters.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from agent._core import CaptureFile
from agent.credentials.sync import CredentialSync
from agent.options import pipeline_from_args
from agent.pipeline import Pipeline
from agent.replay_end import (DAMAGED_RECORDS, Interrupted, close_without_waiting, finish, ignore_stop_signals,
                              stop_signals_deferred, stop_signals_interrupt, stop_waiting)
from agent.sink import Sink
from agent.sink.ingest import DeliveryStalled
from agent.workers import receive, send_counters, send_events, spawn

log = logging.getLogger("agent.replay")

BATCH_FRAMES = 8192


def replay(args: argparse.Namespace, credentials: CredentialSync | None, open_sink: Callable[[], Sink]) -> int:
    """Every event is handed to the sink (and, for an ingest endpoint, acknowledged) before this returns;
    the summary line goes to stderr; the exit status is `replay_end.finish`'s."""
    capture = CaptureFile(args.read)  # a file that is not a capture fails here, with one line
    snap_length = capture.snap_length
    capture.close()
    if credentials is not None:
        credentials.load_once()
    pipeline_from_args(args, credentials)  # so do bad metering options, before any output is opened
    sink = open_sink()
    counters: dict[str, int] = {}
    with stop_signals_interrupt():
        try:
            if args.workers > 1:
                counters = _replay_in_workers(args, credentials, sink, args.workers)
            else:
                counters = replay_share(args, credentials, sink.write, 0, 1)
            sink.close()  # waits for acknowledgements: may be interrupted, or give up
        except (Interrupted, DeliveryStalled) as ended:
            ignore_stop_signals()
            close_without_waiting(sink)
            return finish(args.read, ended.counters or counters, sink.counters(),
                          exit_when_spooled=args.exit_when_spooled,
                          stop=ended if isinstance(ended, Interrupted) else None,
                          gave_up=str(ended) if isinstance(ended, DeliveryStalled) else None,
                          snap_length=snap_length)
        except BaseException:
            sink.close()
            raise
        return finish(args.read, counters, sink.counters(), exit_when_spooled=args.exit_when_spooled,
                      snap_length=snap_length)


def replay_share(args: argparse.Namespace, credentials: CredentialSync | None, emit: Callable[[bytes], None],
                 share: int, shares: int) -> dict[str, int]:
    """Replay the connections dealt to `share` of `shares` (the core deals them: each connection to one
    share, in turn as they first appear); returns the counters."""
    capture = CaptureFile(args.read)
    pipeline = pipeline_from_args(args, credentials, share, shares)
    try:
        more = True
        while more:
            events, more = pipeline.feed_capture(capture, BATCH_FRAMES)
            if events:
                emit(events)
        events = pipeline.finish()
        if events:
            emit(events)
    except (Interrupted, DeliveryStalled) as ended:
        ended.counters = _share_counters(pipeline, capture, args.read, share)
        raise
    finally:
        capture.close()
    return _share_counters(pipeline, capture, args.read, share)


def _share_counters(pipeline: Pipeline, capture: CaptureFile, path: str, share: int) -> dict[str, int]:
    """The pipeline's counters, with the records the file lost (counted, and logged by kind, by share 0
    alone: the summary line only has their number)."""
    counters = pipeline.counters()
    damaged = capture.truncated_records if share == 0 else 0  # every share reads the whole file
    counters["corrupt_packets"] += damaged
    counters[DAMAGED_RECORDS] = damaged
    for reason, count in capture.losses() if share == 0 else ():
        log.warning("%s: %d record%s skipped: %s", path, count, "" if count == 1 else "s", reason)
    return counters


def _replay_in_workers(args: argparse.Namespace, credentials: CredentialSync | None, sink: Sink,
                       workers: int) -> dict[str, int]:
    def work(share: int, writer: Connection) -> int:
        def emit(events: bytes) -> None:
            with stop_signals_deferred():
                send_events(writer, events)

        try:
            counters, status = replay_share(args, credentials, emit, share, workers), 0
        except Interrupted as stop:  # the parent's SIGTERM, or a Ctrl-C to the whole process group
            counters, status = stop.counters or {}, stop.exit_status
        send_counters(writer, counters)
        return status

    children = spawn(workers, work)
    totals: dict[str, int] = {}
    try:
        failed = _collect(children, sink, totals)
    except (Interrupted, DeliveryStalled) as ended:
        ignore_stop_signals()
        stop_waiting(sink)
        for pid in children.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _collect(children, sink, totals)
        ended.counters = totals
        raise
    if failed:
        raise OSError("a replay worker failed; its events are incomplete")
    return totals


def _collect(children: dict[Connection, int], sink: Sink, totals: dict[str, int]) -> bool:
    """The workers' events into the sink and their counters into `totals`, until every worker has ended;
    True if one failed."""
    failed = False
    while children:
        for reader in wait(list(children)):
            assert isinstance(reader, Connection)
            try:
                message = reader.recv_bytes()
            except (EOFError, OSError):
                _, status = os.waitpid(children.pop(reader), 0)
                failed = failed or os.waitstatus_to_exitcode(status) != 0
                continue
            events = receive(message, totals)
            if events is not None:
                sink.write(events)
    return failed
