"""What each sink costs per event: 100,000 events (shaped like the agent's) written 100 at a time.

    python scripts/bench_sinks.py [--events N]

Each sink's `write()` is given JSON Lines bytes, as the pipeline hands them over; the figure is the time inside
`write()` (best of three). The ingest sink's endpoint is unreachable with a long backoff, so its figure is the
spool path alone; its delivery thread's own check of each event is timed apart. `encode` is what the Python
pipeline spends making the JSON Lines, which the core's pipeline does instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.backoff import Backoff  # noqa: E402
from agent.sink import split_lines  # noqa: E402
from agent.sink.ingest import IngestSettings, IngestSink, api_token_source  # noqa: E402
from agent.sink.jsonl import JsonLinesSink  # noqa: E402
from agent.sink.spool import Spool  # noqa: E402
from agent.sink.store import StoreSink  # noqa: E402
from agent.sink.validate import parse_line  # noqa: E402
from tests.doubles.ingest import json_lines, kong_events  # noqa: E402

CHUNK = 100
RUNS = 3
Opened = tuple[Callable[[bytes], object], Callable[[], object]]


def best(count: int, chunks: list[bytes], open_sink: Callable[[], Opened]) -> float:
    """Microseconds per event inside write(), the best of RUNS fresh sinks."""
    times = []
    for _ in range(RUNS):
        write, close = open_sink()
        started = time.perf_counter()
        for chunk in chunks:
            write(chunk)
        times.append(time.perf_counter() - started)
        close()
    return min(times) / count * 1e6


def report(name: str, microseconds: float) -> None:
    print(f"{name:34s} {microseconds:6.2f} us/event  ({1e6 / microseconds:>12,.0f} events/s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    count = parser.parse_args().events
    logging.disable(logging.CRITICAL)
    events = kong_events(0, count)
    started = time.perf_counter()
    chunks = [json_lines(events[i:i + CHUNK]) for i in range(0, count, CHUNK)]
    report("encode (Python pipeline, orjson)", (time.perf_counter() - started) / count * 1e6)
    lines = [line for chunk in chunks for line in split_lines(chunk)]
    print(f"{count} events, {sum(map(len, chunks)) / count:.0f} bytes each, {CHUNK} per write()")

    with tempfile.TemporaryDirectory() as work:
        directory = Path(work)
        opened = iter(range(1_000_000))

        def fresh(name: str) -> Path:
            return directory / f"{name}-{next(opened)}"

        def jsonl() -> Opened:
            sink = JsonLinesSink(str(fresh("out")))
            return sink.write, sink.close

        def store() -> Opened:
            sink = StoreSink(fresh("store") / "events.sqlite3")
            return sink.write, sink.close

        def spool() -> Opened:
            kept = Spool(fresh("spool"), 1 << 30)
            return (lambda chunk: kept.append(chunk, block=False)), kept.close

        def ingest() -> Opened:
            sink = IngestSink(IngestSettings("http://127.0.0.1:9/", fresh("ingest"), backoff=Backoff(60.0, 60.0)),
                              api_token_source())
            return sink.write, lambda: sink.close(wait_for_ack=False)

        report("JsonLinesSink.write", best(count, chunks, jsonl))
        report("StoreSink.write", best(count, chunks, store))
        report("Spool.append", best(count, chunks, spool))
        report("IngestSink.write", best(count, chunks, ingest))
    started = time.perf_counter()
    for line in lines:
        parse_line(line)
    report("ingest delivery check (parse_line)", (time.perf_counter() - started) / count * 1e6)
    started = time.perf_counter()
    for line in lines:
        orjson.loads(line)
    report("  of which orjson.loads", (time.perf_counter() - started) / count * 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
