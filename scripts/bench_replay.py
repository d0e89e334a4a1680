"""Replay speed and memory against tshark, on a keep-alive load capture recorded here.

Records the load the issue describes (nginx stand-in with key-auth, `wrk -t2 -c32 -d4s`, four keys
rotating, one of them invalid), once for D seconds and once for 2*D, then times, side by side in one run:

    agent --read FILE --port P --credentials captures/kong.yaml --output events.jsonl
    tshark -r FILE -Y http.request -T fields -e http.request.uri

with one worker and with two. Then, one worker, what the route matching costs: the same capture with
`--routes N` routes configured (50 by default: prefixes, hosts, methods, headers, regexes, and a catch-all
last, so every request is routed after the router has tried the others; the metering-and-billing plugin
global) against the same consumers with no routes at all, alternating, the best of three each. It checks
the agent's events against nginx's access log one for one (subject, method, uri, status, sizes), and prints
packets/s, requests/s, peak RSS, the speed ratio and the routes' cost per request.
Exits non-zero if a replay is not exact, if one worker is not at least 10x faster than tshark (the goal
is 20x), or if peak RSS grows by more than 20% on the capture twice as long.

    python scripts/bench_replay.py [--duration 4] [--routes 50] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dpkt
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kong_standin import KongStandin, billed_rows, free_loopback_port, metered_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ["alice-key-7f3a9c", "bob-key-41d2e8", "carol-key-new-9c1f", "not-a-key-0000"]
WRK_SCRIPT = """
local keys = {%s}
local n = 0
request = function()
  n = n + 1
  local path = "/orders/" .. (n %% 97)
  if n %% 3 == 0 then
    return wrk.format("GET", path .. "?apikey=" .. keys[(n %% 4) + 1] .. "&page=" .. (n %% 7), {})
  end
  return wrk.format("GET", path, {["apikey"] = keys[(n %% 4) + 1]})
end
""" % ", ".join(f'"{key}"' for key in KEYS)


def record(directory: Path, seconds: int) -> tuple[Path, int, list[dict]]:
    """A capture of `seconds` of wrk load, the gateway port, and nginx's access log entries."""
    port = free_loopback_port()
    capture = directory / f"load-{seconds}s.pcap"
    lua = directory / "rotate.lua"
    lua.write_text(WRK_SCRIPT)
    with KongStandin(port=port, workers=2, ipv6=False) as gateway:
        # A large buffer and no immediate mode: tcpdump must not drop a packet of the load it records.
        tcpdump = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-s", "0", "-B", str(1 << 20), "-n", "-w", str(capture), f"tcp port {port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert tcpdump.stderr is not None
        if "listening on" not in tcpdump.stderr.readline():
            raise SystemExit("tcpdump did not start")
        subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", "-s", str(lua), f"http://127.0.0.1:{port}/"],
                       check=True, capture_output=True, timeout=seconds + 30)
        # libpcap hands over a ring block once it is full or a second old; a SIGINT before then would lose
        # the last block's packets without counting them as drops
        time.sleep(2)
        tcpdump.send_signal(signal.SIGINT)
        _, stderr = tcpdump.communicate(timeout=60)
        dropped = [line for line in stderr.splitlines() if "dropped by kernel" in line]
        if not dropped or not dropped[0].startswith("0 "):
            raise SystemExit(f"tcpdump lost packets while recording: {stderr.strip()}")
        entries = gateway.access_log_entries()
    return capture, port, entries


def timed(command: list[str], stdout) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MiB (the process and its workers, sampled every 10 ms) and stderr."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, cwd=REPO)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {stderr.strip()}")
    return elapsed, peak / (1 << 20), stderr


def packet_count(capture: Path) -> int:
    with open(capture, "rb") as handle:
        return sum(1 for _ in dpkt.pcap.Reader(handle))


def deck_with_routes(directory: Path, count: int) -> Path:
    """captures/kong.yaml's consumers and key-auth with `count` routes over a few services, the last one
    the catch-all the load's requests end up on, and the metering-and-billing plugin global; with 0, no
    services, routes nor plugin entries at all (nothing to match)."""
    state = yaml.safe_load((REPO / "captures" / "kong.yaml").read_text())
    if count == 0:
        state.pop("services", None)
        path = directory / "kong-no-routes.yaml"
        path.write_text(yaml.safe_dump(state))
        return path
    routes = []
    for n in range(count - 1):
        route: dict = {"name": f"route-{n}", "paths": [f"/api/v{n % 3}/resource-{n}"]}
        if n % 5 == 1:
            route["hosts"] = [f"tenant-{n}.example.com", "*.partners.example.com"]
        if n % 7 == 2:
            route["methods"] = ["POST", "PUT"]
        if n % 11 == 3:
            route["headers"] = {"x-version": ["2", "3"]}
        if n % 13 == 4:
            route["paths"] = [f"~/items/{n}/\\d+$"]
            route["regex_priority"] = n
        routes.append(route)
    services = [{"name": f"service-{s}", "url": f"http://10.0.0.{s}:8080", "routes": routes[s::4]} for s in range(4)]
    services.append({"name": "orders", "url": "http://127.0.0.1:9000", "routes": [{"name": "all", "paths": ["/"]}]})
    state["services"] = services
    state["plugins"].append({"name": "metering-and-billing", "config": {"subject": {"look_up_value_in": "consumer"}}})
    path = directory / f"kong-{count}-routes.yaml"
    path.write_text(yaml.safe_dump(state))
    return path


def measure(directory: Path, seconds: int, route_count: int) -> dict:
    capture, port, entries = record(directory, seconds)
    events_file = directory / f"events-{seconds}s.jsonl"
    agent = [sys.executable, "-m", "agent", "--read", str(capture), "--port", str(port),
             "--credentials", str(REPO / "captures" / "kong.yaml"), "--output", str(events_file)]
    tshark = ["tshark", "-r", str(capture), "-Y", "http.request", "-T", "fields", "-e", "http.request.uri"]
    with open(directory / "tshark.out", "w") as out:
        tshark_seconds, _, _ = timed(tshark, out)
    tshark_requests = sum(1 for _ in open(directory / "tshark.out"))
    runs = {}
    for workers in (1, 2):
        runs[workers] = timed([*agent, "--workers", str(workers)], subprocess.DEVNULL)
        check_exact(events_file, entries, f"{seconds}s capture, {workers} worker(s)")
    for count in (0, route_count) * 3:
        command = [*agent[:-4], "--credentials", str(deck_with_routes(directory, count)), *agent[-2:]]
        best = runs.get(("routes", count))
        run = timed(command, subprocess.DEVNULL)
        check_exact(events_file, entries, f"{seconds}s capture, {count} routes")
        runs[("routes", count)] = run if best is None or run[0] < best[0] else best
    return {
        "seconds": seconds, "packets": packet_count(capture), "requests": len(entries),
        "billed": sum(billed_rows(entries).values()), "tshark_requests": tshark_requests, "tshark_s": tshark_seconds,
        "runs": runs,
    }


def check_exact(events_file: Path, entries: list[dict], label: str) -> None:
    """The replay must be exact: one event for every billed line of nginx's log, and nothing else."""
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    if metered_rows(events) != billed_rows(entries):
        raise SystemExit(f"FAIL: {label}: the events differ from nginx's access log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=4, help="seconds of wrk load (the long run is twice this)")
    parser.add_argument("--routes", type=int, default=50, help="routes configured in the third run")
    parser.add_argument("--keep", type=Path, help="keep captures and events in this directory")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="bench-replay-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        short = measure(directory, args.duration, args.routes)
        long = measure(directory, args.duration * 2, args.routes)
    finally:
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)
    failures = []
    for run in (short, long):
        print(f"{run['seconds']}s of load: {run['packets']} packets, {run['requests']} requests "
              f"({run['billed']} billed; tshark sees {run['tshark_requests']}); tshark takes {run['tshark_s']:.2f} s")
        for workers, (seconds, rss, stderr) in run["runs"].items():
            if isinstance(workers, tuple):
                continue
            ratio = run["tshark_s"] / seconds
            print(f"  agent, {workers} worker(s): {seconds:.2f} s = {run['packets'] / seconds:,.0f} packets/s, "
                  f"{run['requests'] / seconds:,.0f} requests/s, peak RSS {rss:.0f} MiB, "
                  f"{ratio:.1f}x faster than tshark; exact")
            if workers == 1 and ratio < 10:
                failures.append(f"{run['seconds']}s: one worker only {ratio:.1f}x faster than tshark (required 10x)")
        plain, routed = run["runs"][("routes", 0)][0], run["runs"][("routes", args.routes)][0]
        print(f"  agent, 1 worker, best of 3: no routes {plain:.2f} s, {args.routes} routes {routed:.2f} s"
              f" ({run['requests'] / routed:,.0f} requests/s): the routes cost"
              f" {(routed - plain) / run['requests'] * 1e6:+.2f} us per request ({(routed / plain - 1) * 100:+.0f}%)")
        print(f"  {run['runs'][1][2].strip().splitlines()[-1]}")
    for workers in (1, 2):
        growth = long["runs"][workers][1] / short["runs"][workers][1]
        print(f"peak RSS with {workers} worker(s), capture twice as long: {short['runs'][workers][1]:.0f} -> "
              f"{long['runs'][workers][1]:.0f} MiB ({(growth - 1) * 100:+.0f}%)")
        if growth > 1.2:
            failures.append(f"RSS grew {growth:.2f}x on a capture twice as long ({workers} worker(s))")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
