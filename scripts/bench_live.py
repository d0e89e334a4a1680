"""Benchmark live capture: what metering costs the gateway, and whether every request is metered.

nginx stands in for Kong (key-auth-like config, 2 workers); wrk drives it with four keys in rotation
(one invalid). Each round measures, for the same duration each:

    gateway alone  the baseline
    tcpdump alone  tcpdump writing the port's whole frames to a file: the cost of capturing at all
    agent wN       the agent capturing live with --workers N, writing JSON Lines

Rounds are interleaved and averaged, because loopback throughput on a shared VM moves by 20% from one run
to the next. For each agent run: requests/s against the mean baseline; every billed access-log line
matched to exactly one event (subject, method, uri, status, request and response size) and the 401s to
the summary's `rejected`; kernel drops from the summary line; the agent's CPU during the load and until
it has caught up after it; peak memory (PSS, ring included) and heap; time to exit after SIGTERM.

    sudo python scripts/bench_live.py [--duration 4] [--rounds 2] [--workers 1 2] [--scrape] [--agent-args ...]

With --scrape, every agent run is made twice side by side in each round, once as above and once with
--metrics-listen and /metrics scraped every second from its start to its stop, so that what monitoring
costs shows as the difference in kept throughput and CPU per request (each scrape is also checked to
parse, and the last one's requests to be the summary line's).

Needs root, nginx, wrk, tcpdump. Exits 1 unless every agent run lost nothing, the kernel dropped
nothing and the gateway kept at least 85% of its throughput (the goal is 90%).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kong_standin import (DEFAULT_DECK_FILE, KongStandin, billed_rows, free_loopback_port,  # noqa: E402
                          load_consumers, metered_rows)

REPO = Path(__file__).resolve().parent.parent
INVALID_KEY = "not-a-known-key-000"
CATCH_UP_LIMIT = 60.0  # seconds the agent may take to empty its ring after the load


def wrk_script(keys: list[str], close: bool = False) -> str:
    """Lua for wrk: each request takes the next key, so every connection carries all four (with `close`,
    each request asks the gateway to close its connection: one connection, and one TLS handshake, each)."""
    quoted = ", ".join(json.dumps(key) for key in keys)
    closing = ', ["Connection"] = "close"' if close else ""
    return f"""
local keys = {{{quoted}}}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/orders/" .. n .. "?page=" .. (n % 7), {{["apikey"] = keys[(n % #keys) + 1]{closing}}})
end
"""


def run_wrk(url: str, script: Path, threads: int, connections: int, duration: float) -> float:
    result = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=duration + 30)
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    if not match:
        raise RuntimeError(f"no Requests/sec in wrk's output: {result.stdout}")
    return float(match.group(1))


def anonymous_memory(pid: int) -> int:
    """RssAnon: the process's own memory, without the ring's pages (which RSS counts once touched)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Sampler:
    """CPU time and peak memory of a process and its children, sampled on a thread."""

    process: psutil.Process
    peak_pss: int = 0
    peak_heap: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in [self.process, *self._children()]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def _children(self) -> list[psutil.Process]:
        try:
            return self.process.children(recursive=True)
        except psutil.Error:
            return []

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            pss = heap = 0
            for process in [self.process, *self._children()]:
                try:
                    pss += process.memory_full_info().pss  # the ring, mapped by two processes, counts once
                    heap += anonymous_memory(process.pid)
                except (psutil.Error, OSError):
                    pass
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_heap = max(self.peak_heap, heap)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


class Scraper:
    """GET /metrics once a second on a thread, as Prometheus would; counts scrapes, failures and the slowest."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes = self.failures = 0
        self.slowest = 0.0
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(1.0):
                started = time.monotonic()
                try:
                    text = client.get(self.url).raise_for_status().text
                    self.last = {sample.name + str(sorted(sample.labels.items())): sample.value
                                 for family in text_string_to_metric_families(text) for sample in family.samples}
                    self.scrapes += 1
                except (httpx.HTTPError, ValueError):
                    self.failures += 1
                self.slowest = max(self.slowest, time.monotonic() - started)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class AgentRun:
    workers: int
    scraped: bool = False
    rps: float = 0.0
    cpu_load: float = 0.0       # CPU seconds per second while wrk ran (1.0 = one core)
    catch_up: float = 0.0       # seconds after wrk until the agent was idle
    cpu_total: float = 0.0      # CPU seconds from start to stop
    peak_pss_mb: float = 0.0
    peak_heap_mb: float = 0.0
    billed: int = 0
    events: int = 0
    matched: bool = False
    kernel_drops: int = -1
    kernel_packets: int = 0
    shutdown: float = 0.0
    boosts: int = 0             # times a ring passed 3/4 and its capture took priority over the gateway
    summary: dict = field(default_factory=dict)
    scrapes: int = 0
    scrape_failures: int = 0
    slowest_scrape: float = 0.0
    scrape_agrees: bool = True  # the last scrape's requests are the summary line's

    @property
    def label(self) -> str:
        return f"agent --workers {self.workers}" + (" +scrape" if self.scraped else "")


def wait_idle(sampler: Sampler, limit: float) -> float:
    """Seconds until the agent uses under 5% of a core over half a second (its ring is empty)."""
    started = time.monotonic()
    previous = sampler.cpu_seconds()
    while time.monotonic() - started < limit:
        time.sleep(0.5)
        now = sampler.cpu_seconds()
        if now - previous < 0.025:
            return time.monotonic() - started
        previous = now
    return time.monotonic() - started


def start_agent(command: list[str]) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """The agent started and capturing, with its stderr collected as it comes (and the thread doing so)."""
    agent = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(agent.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + 20
    while not any("capturing on" in line for line in lines):
        if agent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the agent did not start: " + "".join(lines))
        time.sleep(0.05)
    time.sleep(0.5)  # the credential table loads
    return agent, lines, reader


def agent_run(gateway: KongStandin, script: Path, args: argparse.Namespace, workers: int, workdir: Path,
              scrape: bool = False) -> AgentRun:
    run = AgentRun(workers, scrape)
    output = workdir / f"events-w{workers}.jsonl"
    log_offset = settled_log_size(gateway.access_log_path)
    metrics_port = free_loopback_port()
    command = [sys.executable, "-m", "agent", "--iface", "lo", "--port", str(gateway.port),
               "--credentials", str(DEFAULT_DECK_FILE), "--output", str(output), "--workers", str(workers),
               *(["--metrics-listen", f"127.0.0.1:{metrics_port}"] if scrape else []), *args.agent_args]
    agent, stderr_lines, reader = start_agent(command)
    scraper = Scraper(metrics_port) if scrape else None
    if scraper is not None:
        scraper.start()
    sampler = Sampler(psutil.Process(agent.pid))
    sampler.start()
    cpu_start = sampler.cpu_seconds()
    run.rps = run_wrk(gateway.base_url, script, args.threads, args.connections, args.duration)
    cpu_after_load = sampler.cpu_seconds()
    run.cpu_load = (cpu_after_load - cpu_start) / args.duration
    run.catch_up = wait_idle(sampler, CATCH_UP_LIMIT)
    run.cpu_total = sampler.cpu_seconds() - cpu_start
    if scraper is not None:
        time.sleep(1.5)  # a last report from each worker, and a scrape of it
        scraper.stop()
        run.scrapes, run.scrape_failures, run.slowest_scrape = scraper.scrapes, scraper.failures, scraper.slowest
    stopped = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=30)
    run.shutdown = time.monotonic() - stopped
    reader.join(timeout=5)
    sampler.stop()
    run.peak_pss_mb = sampler.peak_pss / 2**20
    run.peak_heap_mb = sampler.peak_heap / 2**20
    summary_lines = [line for line in stderr_lines if line.startswith("summary: ")]
    if agent.returncode != 0 or not summary_lines:
        raise RuntimeError(f"the agent exited {agent.returncode}: " + "".join(stderr_lines[-5:]))
    if args.verbose:
        print("".join(f"    {line}" for line in stderr_lines if not line.startswith("summary: ")), end="")
    run.boosts = sum(1 for line in stderr_lines if "takes priority over the gateway" in line)
    run.summary = {k: int(v) for k, v in (pair.split("=") for pair in summary_lines[-1].split()[1:])}
    run.kernel_drops = run.summary["kernel_drops"]
    run.kernel_packets = run.summary["kernel_packets"]
    if scraper is not None:
        run.scrape_agrees = scraper.last.get("agent_requests_total[]") == run.summary["requests"]

    time.sleep(0.5)  # nginx writes a line once its request is done
    entries = log_entries_from(gateway.access_log_path, log_offset)
    billed = billed_rows(entries)
    events = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    metered = metered_rows(events)
    run.billed, run.events = sum(billed.values()), len(events)
    run.matched = billed == metered and run.summary["rejected"] == sum(1 for e in entries if e["status"] == 401)
    if not run.matched:
        missing, extra = billed - metered, metered - billed
        print(f"  w{workers}: {sum(missing.values())} billed lines without an event, "
              f"{sum(extra.values())} events without a line; e.g. {list(missing)[:2]} {list(extra)[:2]}")
    return run


def settled_log_size(path: Path, quiet: float = 0.3, limit: float = 5.0) -> int:
    """The access log's size once nginx has stopped writing to it: the lines of a load that just ended
    (the 499s of requests in flight when wrk closed its connections) come a few milliseconds after wrk exits,
    and must not be counted in the next run."""
    size, deadline = path.stat().st_size, time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = path.stat().st_size
        if now == size:
            break
        size = now
    return size


def log_entries_from(path: Path, offset: int) -> list[dict]:
    """The access-log lines written after `offset` (reading only those: the log grows by ~10^5 lines a run)."""
    with path.open("rb") as log:
        log.seek(offset)
        lines = log.read().splitlines()
    entries = []
    for line in lines:
        raw = json.loads(line)
        entries.append({"consumer": raw["consumer"], "request_method": raw["request_method"],
                        "request_uri": raw["request_uri"], "status": int(raw["status"]),
                        "request_length": int(raw["request_length"]), "bytes_sent": int(raw["bytes_sent"])})
    return entries


def tcpdump_run(gateway: KongStandin, script: Path, args: argparse.Namespace, workdir: Path) -> tuple[float, str]:
    """The reference: tcpdump writing whole frames of the port to a file, with a ring as big as the agent's."""
    capture = workdir / "tcpdump.pcap"
    tcpdump = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-s", "0", "-B", str(256 * 1024), "-w", str(capture), "-U", "tcp", "port",
         str(gateway.port)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    assert tcpdump.stderr is not None
    while "listening on" not in tcpdump.stderr.readline():
        if tcpdump.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tcpdump did not start")
    rps = run_wrk(gateway.base_url, script, args.threads, args.connections, args.duration)
    time.sleep(1.0)
    tcpdump.send_signal(signal.SIGINT)
    _, err = tcpdump.communicate(timeout=30)
    dropped = re.search(r"(\d+) packets dropped by kernel", err)
    capture.unlink(missing_ok=True)
    return rps, dropped.group(1) if dropped else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run (default 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="agent runs to make (default 1 2)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times each measurement is repeated, interleaved (default 2): loopback throughput "
                             "on a shared VM varies by 20%% from one run to the next")
    parser.add_argument("--no-tcpdump", action="store_true", help="skip the tcpdump reference runs")
    parser.add_argument("--scrape", action="store_true",
                        help="also run each agent with --metrics-listen, scraped every second, side by side")
    parser.add_argument("--verbose", action="store_true", help="show the agent's log lines")
    parser.add_argument("--agent-args", nargs=argparse.REMAINDER, default=[], help="extra agent flags (last)")
    args = parser.parse_args(argv)

    keys = load_consumers(DEFAULT_DECK_FILE)
    by_subject: dict[str, str] = {}
    for key, (subject, _) in keys.items():
        by_subject.setdefault(subject, key)
    rotation = [*list(by_subject.values())[:3], INVALID_KEY]

    baselines: list[float] = []
    references: list[tuple[float, str]] = []
    runs: dict[str, list[AgentRun]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-live-") as temp, \
            KongStandin(port=free_loopback_port(), workers=2) as gateway:
        workdir = Path(temp)
        script = workdir / "keys.lua"
        script.write_text(wrk_script(rotation))
        run_wrk(gateway.base_url, script, args.threads, args.connections, 1.0)  # warm up
        for _ in range(args.rounds):
            baselines.append(run_wrk(gateway.base_url, script, args.threads, args.connections, args.duration))
            if not args.no_tcpdump:
                references.append(tcpdump_run(gateway, script, args, workdir))
            for workers in args.workers:
                for scrape in (False, True) if args.scrape else (False,):
                    run = agent_run(gateway, script, args, workers, workdir, scrape)
                    runs.setdefault(run.label, []).append(run)
    return report(args, baselines, references, runs)


def report(args: argparse.Namespace, baselines: list[float], references: list[tuple[float, str]],
           runs: dict[str, list[AgentRun]]) -> int:
    baseline = statistics.mean(baselines)
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, four keys in rotation (one invalid); "
          f"nginx with 2 workers; {psutil.cpu_count()} cores; {args.rounds} interleaved rounds, means")
    print(f"{'':29}{'req/s':>8} {'kept':>6}   runs")
    print(f"{'gateway alone':29}{baseline:8.0f} {'':>6}   {', '.join(f'{b:.0f}' for b in baselines)}")
    if references:
        rps = statistics.mean(r for r, _ in references)
        print(f"{'tcpdump alone':29}{rps:8.0f} {rps / baseline:6.1%}   "
              f"{', '.join(f'{r:.0f}' for r, _ in references)} (kernel drops: {', '.join(d for _, d in references)})")
    ok = True
    for label, group in runs.items():
        rps = statistics.mean(run.rps for run in group)
        cpu_per_request = statistics.mean(run.cpu_total / max(run.billed, 1) * 1e6 for run in group)
        print(f"{label:29}{rps:8.0f} {rps / baseline:6.1%}   {', '.join(f'{run.rps:.0f}' for run in group)}"
              f"   (CPU/req {cpu_per_request:.0f}us)")
        ok &= rps / baseline >= 0.85
    print(f"\n{'':29}{'billed':>8} {'events':>8} {'1:1':>4} {'drops':>6} {'CPU load':>9} {'catch-up':>9} "
          f"{'CPU/req':>8} {'memory':>7} {'heap':>7} {'stop':>6} {'boosts':>7}")
    for label, group in runs.items():
        for run in group:
            matched = "yes" if run.matched else "NO"
            print(f"{label:29}{run.billed:8d} {run.events:8d} {matched:>4} "
                  f"{run.kernel_drops:6d} {run.cpu_load:8.0%} {run.catch_up:8.1f}s "
                  f"{run.cpu_total / max(run.billed, 1) * 1e6:6.0f}us {run.peak_pss_mb:5.0f}MB "
                  f"{run.peak_heap_mb:5.0f}MB {run.shutdown:5.1f}s {run.boosts:7d}")
            ok &= run.matched and run.kernel_drops == 0
    print()
    for label, group in runs.items():
        if group[0].scraped:
            print(f"{label}: {sum(run.scrapes for run in group)} scrapes, {sum(run.scrape_failures for run in group)}"
                  f" failed, slowest {max(run.slowest_scrape for run in group) * 1000:.0f} ms; the last scrape's"
                  f" requests are the summary line's in {sum(run.scrape_agrees for run in group)} of {len(group)} runs")
            ok &= all(run.scrape_failures == 0 and run.scrape_agrees for run in group)
    print("CPU load: the agent's CPU seconds per second of load (100% = one core). Catch-up: from the end of the\n"
          "load until the agent was idle. CPU/req: all its CPU time per billed request (401s are work too).\n"
          "Memory: proportional set size of the agent's processes, the kernel ring's pages included once touched;\n"
          "heap: their own anonymous memory (RssAnon), without the ring. Boosts: times a ring passed 3/4 full and\n"
          "its capture took priority over the gateway (0: the load was absorbed as a burst).")
    print("result:", "PASS" if ok else "FAIL", "(zero lost requests, zero kernel drops, at least 85% kept)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
