"""Replay mode: a capture file through the pipeline into a sink (for tests and for backfilling usage)."""

from __future__ import annotations

import argparse
import sys

from agent.credentials.sync import CredentialSync
from agent.options import pipeline_from_args
from agent.pipeline import summary_line
from agent.sink import Sink
from agent.source.capture_file import CaptureFile

BATCH_FRAMES = 8192


def replay(args: argparse.Namespace, credentials: CredentialSync | None, sink: Sink) -> int:
    """Every event is handed to the sink before this returns; the summary line goes to stderr."""
    capture = CaptureFile(args.read)
    if credentials is not None:
        credentials.load_once()
    pipeline = pipeline_from_args(args, credentials)
    try:
        for batch in capture.batches(BATCH_FRAMES):
            events = pipeline.feed(batch)
            if events:
                sink.write(events)
        events = pipeline.finish()
        if events:
            sink.write(events)
    finally:
        capture.close()
    sink.close()
    counters = pipeline.counters()
    counters["corrupt_packets"] += capture.truncated_records
    print(summary_line(counters), file=sys.stderr)
    return 0
