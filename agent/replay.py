"""Replay mode: a capture file through the pipeline into a sink (for tests and for backfilling usage).

With `--workers N`, N processes each read the whole file but handle only the connections dealt to them
(every connection stays in one process, as in live capture); the parent collects their events into the
one sink and sums their counters.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from agent.credentials.sync import CredentialSync
from agent.options import pipeline_from_args
from agent.pipeline import Pipeline, tune_garbage_collector
from agent.replay_end import (DAMAGED_RECORDS, Interrupted, close_without_waiting, finish, ignore_stop_signals,
                              stop_signals_deferred, stop_signals_interrupt, stop_waiting)
from agent.sink import Sink
from agent.sink.ingest import DeliveryStalled
from agent.source.capture_file import CaptureFile
from agent.source.frames import flow_hash
from agent.workers import receive, send_counters, send_events, spawn

BATCH_FRAMES = 8192


def replay(args: argparse.Namespace, credentials: CredentialSync | None, open_sink: Callable[[], Sink]) -> int:
    """Every event is handed to the sink (and, for an ingest endpoint, acknowledged) before this returns;
    the summary line goes to stderr; the exit status is `replay_end.finish`'s."""
    CaptureFile(args.read).close()  # a file that is not a capture fails here, with one line
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
                          gave_up=str(ended) if isinstance(ended, DeliveryStalled) else None)
        except BaseException:
            sink.close()
            raise
        return finish(args.read, counters, sink.counters(), exit_when_spooled=args.exit_when_spooled)


def replay_share(args: argparse.Namespace, credentials: CredentialSync | None, emit, share: int,
                 shares: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Replay the connections dealt to `share` of `shares`; returns the counters."""
    capture = CaptureFile(args.read, report_losses=share == 0)
    pipeline = pipeline_from_args(args, credentials)
    tune_garbage_collector()
    try:
        owner = ConnectionDealer(shares)
        for batch in capture.batches(BATCH_FRAMES):
            if shares > 1:
                batch = [frame for frame in batch if owner(frame[1], frame[2]) == share]
            events = pipeline.feed(batch)
            if events:
                emit(events)
        events = pipeline.finish()
        if events:
            emit(events)
    except (Interrupted, DeliveryStalled) as ended:
        ended.counters = _share_counters(pipeline, capture, share)
        raise
    finally:
        capture.close()
    return _share_counters(pipeline, capture, share)


def _share_counters(pipeline: Pipeline, capture: CaptureFile, share: int) -> dict[str, int]:
    """The pipeline's counters, with the records the file lost (counted by share 0 alone)."""
    counters = pipeline.counters()
    damaged = capture.truncated_records if share == 0 else 0
    counters["corrupt_packets"] += damaged
    counters[DAMAGED_RECORDS] = damaged
    return counters


class ConnectionDealer:
    """Which worker a frame belongs to: connections are dealt out in turn as they first appear, so the
    workers get equal shares (a hash alone left one with 58% of a 33-connection load). Every worker
    sees the same frames in the same order, so each one deals the same way without talking to the others.
    Connections are told apart by flow hash: two that share one share a worker, and the table stays small.
    Frames no connection claims (not TCP, corrupt) are share 0's, to be counted once."""

    def __init__(self, shares: int) -> None:
        self.shares = shares
        self._owners: dict[int, int] = {}
        self._dealt = 0

    def __call__(self, linktype: int, frame: bytes) -> int:
        flow = flow_hash(linktype, frame)
        if flow < 0:
            return 0
        owner = self._owners.get(flow)
        if owner is None:
            owner = self._owners[flow] = self._dealt % self.shares
            self._dealt += 1
        return owner


def _replay_in_workers(args: argparse.Namespace, credentials: CredentialSync | None, sink: Sink,
                       workers: int) -> dict[str, int]:
    def work(share: int, writer: Connection) -> int:
        def emit(events: list[dict]) -> None:
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
