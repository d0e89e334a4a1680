"""kill -9 mid-stream: every event that reached the spool is delivered by the next agent on that spool.

The agent here is a small driver process (this file run as a script) that feeds events through an
IngestSink and prints the last event id after each `write()` returned: from then on that event must
not be lost, whatever happens to the process.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.backoff import Backoff
from agent.sink.ingest import IngestSettings, IngestSink, api_token_source
from tests.doubles.ingest import Fault, IngestDouble, json_lines, kong_events

TOKEN = "kill-test-token"
ROOT = Path(__file__).resolve().parents[1]


def drive(argv: list[str]) -> int:
    """The driver: write events [first, first+count) in small writes, report each, then drain and exit."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--spool-dir", type=Path, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.001, help="seconds between writes, as live traffic")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sink = IngestSink(IngestSettings(args.endpoint, args.spool_dir, batch_size=200, flush_interval=0.02,
                                     backoff=Backoff(0.02, 0.2), block_when_full=True, ack_timeout=60),
                      api_token_source())
    end = args.first + args.count
    for start in range(args.first, end, 7):
        events = kong_events(start, min(7, end - start))
        sink.write(json_lines(events))
        print(events[-1]["id"], flush=True)
        time.sleep(args.pause)
    sink.close()
    print("done", flush=True)
    return 0


def _start(endpoint: str, spool_dir: Path, first: int, count: int) -> tuple[subprocess.Popen, queue.Queue]:
    env = dict(os.environ, METERING_API_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, __file__, "--endpoint", endpoint, "--spool-dir", str(spool_dir),
         "--first", str(first), "--count", str(count)],
        stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in process.stdout], daemon=True).start()
    return process, lines


def _kill_after(process: subprocess.Popen, lines: queue.Queue, confirmed_ids: int,
                ready: Callable[[], bool] = lambda: True) -> list[str]:
    """Collect reported ids until `confirmed_ids` of them and `ready()`, then SIGKILL; return every id
    reported before the kill."""
    reported: list[str] = []
    deadline = time.monotonic() + 30
    while len(reported) < confirmed_ids or not ready():
        assert time.monotonic() < deadline, "the driver did not get there"
        try:
            reported.append(lines.get(timeout=0.05))
        except queue.Empty:
            pass
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    while not lines.empty():
        reported.append(lines.get())
    return [line for line in reported if line.startswith("evt-")]


def _ids_up_to(first: int, last_id: str) -> set[str]:
    return {f"evt-{i:09d}" for i in range(first, int(last_id.removeprefix("evt-")) + 1)}


def test_nothing_that_reached_the_spool_is_lost_across_two_kill_9(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    per_run = 20_000
    with IngestDouble(TOKEN) as double:
        double.inject(Fault("delay", delay=0.2, times=None))  # much slower than the writes: a backlog builds up
        first, lines = _start(double.url, spool, 0, per_run)
        reported_first = _kill_after(first, lines, 600, ready=lambda: len(double.accepted) > 0)
        assert first.returncode == -signal.SIGKILL
        assert len(double.accepted) < len(_ids_up_to(0, reported_first[-1])), "the kill should come mid-stream"

        second, lines = _start(double.url, spool, per_run, per_run)
        reported_second = _kill_after(second, lines, 400)
        assert second.returncode == -signal.SIGKILL

        double.clear_faults()
        third, lines = _start(double.url, spool, 0, 0)
        assert third.wait(60) == 0
        assert lines.get(timeout=5) == "done"
        accepted = double.accepted_counts()

    must_arrive = _ids_up_to(0, reported_first[-1]) | _ids_up_to(per_run, reported_second[-1])
    delivered_ids = {event_id for _, event_id in accepted}
    assert must_arrive <= delivered_ids, f"{len(must_arrive - delivered_ids)} spooled events lost"
    assert delivered_ids <= {f"evt-{i:09d}" for i in range(2 * per_run)}, "foreign events"
    assert {source for source, _ in accepted} == {"kong-metering-agent/test"}
    assert list(spool.glob("spool-*.jsonl")) == []


if __name__ == "__main__":
    sys.exit(drive(sys.argv[1:]))
