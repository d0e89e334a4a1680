"""Replay mode: a capture file through the pipeline into a sink (for tests and for backfilling usage).

With `--workers N`, N processes each read the whole file but handle only the connections dealt to them
(every connection stays in one process, as in live capture); the parent collects their events into the
one sink and sums their counters.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from agent._core import CaptureFile
from agent.credentials.sync import CredentialSync
from agent.options import pipeline_from_args
from agent.pipeline import summary_line
from agent.sink import Sink
from agent.workers import receive, send_counters, send_events, spawn

log = logging.getLogger("agent.replay")

BATCH_FRAMES = 8192


def replay(args: argparse.Namespace, credentials: CredentialSync | None, open_sink: Callable[[], Sink]) -> int:
    """Every event is handed to the sink (and, for an ingest endpoint, acknowledged) before this returns;
    the summary line goes to stderr. Exit 1 when events are left undelivered."""
    CaptureFile(args.read).close()  # a file that is not a capture fails here, with one line
    if credentials is not None:
        credentials.load_once()
    pipeline_from_args(args, credentials)  # so do bad metering options, before any output is opened
    sink = open_sink()
    try:
        if args.workers > 1:
            counters = _replay_in_workers(args, credentials, sink, args.workers)
        else:
            counters = replay_share(args, credentials, sink.write, 0, 1)
    finally:
        sink.close()
    delivery = sink.counters()
    print(summary_line({**counters, **delivery}), file=sys.stderr)
    if delivery.get("pending") and not args.exit_when_spooled:
        print(f"agent: error: {delivery['pending']} events are still in the spool, not yet acknowledged;"
              " the next start sends them", file=sys.stderr)
        return 1
    if delivery.get("dead_lettered"):
        print(f"agent: error: the ingest endpoint refused {delivery['dead_lettered']} events as invalid; they are"
              " in the dead-letter file, not delivered", file=sys.stderr)
        return 1
    return 0


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
    finally:
        capture.close()
    counters = pipeline.counters()
    if share == 0:  # every share reads the whole file: one of them reports what it lost
        counters["corrupt_packets"] += capture.truncated_records
        for reason, count in capture.losses():
            log.warning("%s: %d record%s skipped: %s", args.read, count, "" if count == 1 else "s", reason)
    return counters


def _replay_in_workers(args: argparse.Namespace, credentials: CredentialSync | None, sink: Sink,
                       workers: int) -> dict[str, int]:
    def work(share: int, writer: Connection) -> int:
        counters = replay_share(args, credentials, lambda events: send_events(writer, events), share, workers)
        send_counters(writer, counters)
        return 0

    children = spawn(workers, work)
    totals: dict[str, int] = {}
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
    if failed:
        raise OSError("a replay worker failed; its events are incomplete")
    return totals
