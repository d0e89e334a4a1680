"""Benchmark event delivery to an ingest endpoint on loopback (the test double, in its own process).

    python scripts/bench_ingest.py                      # all three modes, 200k events each
    python scripts/bench_ingest.py --mode throughput --events 500000

- throughput: events per second through the spool (`write()`) and delivered end to end (first write to
  the last acknowledgement), with the default batch size and flush interval.
- outage: the endpoint answers 503 for its first 3 s and resets connections for 2 s more; every event
  must still be delivered (checked by (source, id) against what was sent).
- replay: the same outage, met by the whole agent replaying a load capture recorded here (nginx stand-in,
  `wrk -t2 -c32 -d4s`, about 200k requests): `agent --read FILE --ingest-endpoint URL` must exit 0 with
  every billed request of nginx's access log delivered, by (source, id) against a replay to JSON Lines.
Exit status 1 when an event is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.backoff import Backoff  # noqa: E402
from agent.sink.ingest import DEFAULT_BATCH_SIZE, IngestSettings, IngestSink, api_token_source  # noqa: E402
from tests.doubles.ingest import V1_PATH, json_lines, kong_events  # noqa: E402

from bench_replay import record  # noqa: E402
from kong_standin import billed_rows  # noqa: E402

TOKEN = "bench-token"
WRITE_CHUNK = 100  # events per write(), as the pipeline hands them over


def start_double(*flags: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "doubles" / "ingest.py"), "--token", TOKEN,
                                *flags], stdout=subprocess.PIPE, text=True)
    base_url = process.stdout.readline().strip()
    if not base_url.startswith("http"):
        process.kill()
        raise SystemExit("the ingest double did not start")
    return process, base_url


def fetch(url: str) -> object:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def run(mode: str, count: int, batch_size: int, backoff: Backoff) -> bool:
    flags = ("--unavailable-for", "3", "--reset-for", "2") if mode == "outage" else ()
    double, base_url = start_double(*flags)
    try:
        with tempfile.TemporaryDirectory() as spool_dir:
            os.environ["METERING_API_TOKEN"] = TOKEN
            settings = IngestSettings(base_url + V1_PATH, Path(spool_dir), batch_size=batch_size,
                                      block_when_full=True, wait_for_ack=True, backoff=backoff)
            sink = IngestSink(settings, api_token_source())
            in_write = 0.0
            started = time.perf_counter()
            for first in range(0, count, WRITE_CHUNK):
                lines = json_lines(kong_events(first, min(WRITE_CHUNK, count - first)))
                before = time.perf_counter()
                sink.write(lines)
                in_write += time.perf_counter() - before
            spooled_at = time.perf_counter() - started
            sink.close()
            elapsed = time.perf_counter() - started
            counters = sink.counters()
        summary = fetch(base_url + "/_double/summary")
        accepted = {tuple(key) for key in fetch(base_url + "/_double/accepted")}
    finally:
        double.terminate()
        double.wait(10)
    sent = {("kong-metering-agent/test", f"evt-{i:09d}") for i in range(count)}
    missing, foreign = len(sent - accepted), len(accepted - sent)
    print(f"[{mode}] {count} events, batch {batch_size}, flush {settings.flush_interval:g} s, backoff"
          f" {backoff.initial:g} s doubling to {backoff.cap:g} s"
          + (" (503 for 3 s, then resets for 2 s)" if mode == "outage" else ""))
    print(f"  spool write: {count / in_write:,.0f} events/s inside write(); all spooled after {spooled_at:.2f} s")
    print(f"  delivered:   {count / elapsed:,.0f} events/s end to end ({elapsed:.2f} s to the last acknowledgement)")
    print(f"  requests: {summary['requests']} (by status: {summary['statuses']}), retried: {counters['retried']}")
    print(f"  accepted: {summary['accepted']} ({summary['accepted'] - summary['unique']} re-sends),"
          f" missing: {missing}, foreign: {foreign}, left in spool: {counters['pending']}")
    return missing == 0 and foreign == 0 and counters["pending"] == 0


def run_replay(seconds: int) -> bool:
    with tempfile.TemporaryDirectory() as work:
        workdir = Path(work)
        capture, port, entries = record(workdir, seconds)
        billed = sum(billed_rows(entries).values())
        replay = [sys.executable, "-m", "agent", "--read", str(capture), "--port", str(port),
                  "--credentials", str(ROOT / "captures" / "kong.yaml")]
        subprocess.run([*replay, "--output", str(workdir / "events.jsonl")], check=True, capture_output=True,
                       cwd=ROOT, timeout=600)
        with (workdir / "events.jsonl").open() as lines:
            expected = {(event["source"], event["id"]) for event in map(json.loads, lines)}
        double, base_url = start_double("--unavailable-for", "3", "--reset-for", "2")
        try:
            started = time.perf_counter()
            agent = subprocess.run([*replay, "--ingest-endpoint", base_url + V1_PATH,
                                    "--data-dir", str(workdir / "data")],
                                   env={**os.environ, "METERING_API_TOKEN": TOKEN}, capture_output=True, text=True,
                                   cwd=ROOT, timeout=600)
            elapsed = time.perf_counter() - started
            summary = fetch(base_url + "/_double/summary")
            accepted = {tuple(key) for key in fetch(base_url + "/_double/accepted")}
        finally:
            double.terminate()
            double.wait(10)
    print(f"[replay] agent --read (a {seconds} s wrk load capture: {len(entries)} requests, {billed} billed)"
          " --ingest-endpoint, 503 for 3 s, then resets for 2 s")
    print(f"  exit {agent.returncode} after {elapsed:.2f} s; requests: {summary['requests']}"
          f" (by status: {summary['statuses']})")
    print(f"  accepted: {summary['accepted']} ({summary['accepted'] - summary['unique']} re-sends),"
          f" missing: {len(expected - accepted)}, foreign: {len(accepted - expected)}")
    if agent.returncode != 0:
        print("  agent stderr: " + agent.stderr.strip().replace("\n", "\n  "))
    return agent.returncode == 0 and len(expected) == billed and accepted == expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("throughput", "outage", "replay", "all"), default="all")
    parser.add_argument("--seconds", type=int, default=4, help="replay mode: seconds of wrk load recorded")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--backoff-initial", type=float, default=Backoff().initial, metavar="SECONDS")
    parser.add_argument("--backoff-cap", type=float, default=Backoff().cap, metavar="SECONDS",
                        help="a low cap (e.g. 1) makes retries land inside the reset window too")
    args = parser.parse_args()
    backoff = Backoff(args.backoff_initial, args.backoff_cap)
    logging.basicConfig(level=logging.WARNING, format="  log: %(levelname)s %(name)s: %(message)s")
    modes = ("throughput", "outage", "replay") if args.mode == "all" else (args.mode,)
    ok = all([run_replay(args.seconds) if mode == "replay" else run(mode, args.events, args.batch_size, backoff)
              for mode in modes])
    print("every event delivered" if ok else "EVENTS LOST")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
