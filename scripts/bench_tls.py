"""Benchmark HTTPS metering (`--tls-port`): what the TLS library's uprobes cost the gateway, and whether every
request is metered.

nginx stands in for Kong (key-auth-like config, 2 workers, TLS with a certificate made at start); wrk drives
its TLS port at saturation over keep-alive connections with four keys in rotation (one invalid). Each round
runs, for the same duration each, the gateway alone (the baseline) and the gateway with the agent metering
it (`--tls-port`, writing JSON Lines); rounds are interleaved and the ratio is of the means, since loopback
throughput on a shared VM moves from one run to the next. For each agent run: requests/s against the
baseline, the gateway's CPU per request (its processes' CPU time over wrk's requests: steadier than
throughput on a shared VM) beside the baseline's, the probes' ring-buffer drops, unfollowed calls and
truncated chunks from the summary line, and every billed access-log line matched to exactly one event (subject, method, uri,
status, request and response size).

    sudo python scripts/bench_tls.py [--duration 5] [--rounds 3] [--connections 32] [--new-connections]
                                     [--trap-floor] [--program-time]

With --trap-floor each round also runs the gateway with bare kernel uprobes at the two places the agent's
probes take per keep-alive request in an nginx (its read site and the TLS library's write worker), scoped to
its workers as the agent's are, with no program behind them: the traps' own cost, which no probe program can
save, and their count per request. With --program-time the kernel also counts the run time of the agent's BPF
programs during its runs (which costs each run two clock reads more): the part of the agent's cost that is its
programs', apart from the traps that start them.

Needs root, nginx, wrk, clang and bpftool at install. Exits 1 unless every run lost nothing, the probes dropped
nothing and the gateway kept at least 80% of its HTTPS throughput (the goal is 90%).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import psutil  # noqa: E402
from bench_live import (CATCH_UP_LIMIT, INVALID_KEY, Sampler, log_entries_from, run_wrk, settled_log_size,  # noqa: E402
                        start_agent, wait_idle, wrk_script)
from kong_standin import DEFAULT_DECK_FILE, KongStandin, billed_rows, free_loopback_port, metered_rows  # noqa: E402

from agent import _core  # noqa: E402
from agent.live.tls import tls_library  # noqa: E402

KEPT_AT_LEAST = 0.80
GOAL = 0.90


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to config2 (PERF_ATTR_SIZE_VER1), all a uprobe counter needs."""
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64)]


SYS_PERF_EVENT_OPEN = 298  # x86_64
SYS_BPF, BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 321, 32, 0  # x86_64


class BareTraps:
    """Counting uprobes (made with the uprobe PMU: a trap costs the same however its uprobe was made) at
    nginx's read site and the write worker, one per gateway worker: each hit is the trap the agent's probe
    takes there, with no program."""

    def __init__(self, gateway: KongStandin) -> None:
        worker = psutil.Process(gateway.pid).children()[0].pid
        executable, library = f"/proc/{worker}/exe", tls_library(worker)  # the running file, as the agent reads it
        if library is None:
            raise RuntimeError(f"pid {worker} maps no TLS library the agent knows")
        read, write = _core.nginx_request_sites(Path(executable).read_bytes(), Path(library).read_bytes())
        if read is None or write is None:
            raise RuntimeError(f"{executable}: not an nginx whose read and write sites the agent finds")
        self.sites = [(executable.encode(), read), (library.encode(), write)]
        self.workers = [child.pid for child in psutil.Process(gateway.pid).children()]
        self.pmu = int(Path("/sys/bus/event_source/devices/uprobe/type").read_text())
        self.fds: list[int] = []

    def __enter__(self) -> "BareTraps":
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in self.workers:
            for path, offset in self.sites:
                path_buffer = ctypes.create_string_buffer(path)
                attr = PerfEventAttr(type=self.pmu, size=ctypes.sizeof(PerfEventAttr),
                                     config1=ctypes.addressof(path_buffer), config2=offset)
                fd = libc.syscall(SYS_PERF_EVENT_OPEN, ctypes.byref(attr), pid, -1, -1, 0)
                if fd < 0:
                    self.__exit__()
                    raise OSError(ctypes.get_errno(), f"perf_event_open(uprobe {path.decode()}:{offset:#x})")
                self.fds.append(fd)
        return self

    def hits(self) -> int:
        return sum(int.from_bytes(os.read(fd, 8), "little") for fd in self.fds)

    def __exit__(self, *_exc: object) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class ProgramTimes:
    """The run time of one process's BPF programs, counted by the kernel while the descriptor that
    BPF_ENABLE_STATS returns is open (no sysctl is left changed if the benchmark dies)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = -1
        self.start = 0

    def __enter__(self) -> "ProgramTimes":
        libc = ctypes.CDLL(None, use_errno=True)
        kind = ctypes.c_uint32(BPF_STATS_RUN_TIME)
        self.fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(kind), ctypes.sizeof(kind))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "bpf(BPF_ENABLE_STATS)")
        self.start = self.nanoseconds()
        return self

    def nanoseconds(self) -> int:
        """The run time so far of the programs that `pid` holds: each program descriptor's fdinfo counts its
        program's (once per program, however many descriptors it has)."""
        run_time: dict[str, int] = {}
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                if os.readlink(fd) != "anon_inode:bpf-prog":
                    continue
                fields = dict(line.split(":", 1) for line in
                              Path(f"/proc/{self.pid}/fdinfo/{fd.name}").read_text().splitlines() if ":" in line)
            except OSError:  # closed meanwhile
                continue
            run_time[fields["prog_id"].strip()] = int(fields.get("run_time_ns", "0"))
        return sum(run_time.values())

    def since_start(self) -> int:
        return self.nanoseconds() - self.start

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


def timed_load(gateway: KongStandin, script: Path, args: argparse.Namespace) -> tuple[float, float]:
    """wrk's requests/s, and the CPU per request in µs of the gateway's processes (master and workers,
    where the probes' cost lands): the steadier of the two figures on a shared VM, where throughput moves
    with whatever else the host runs."""
    gateway_cpu = Sampler(psutil.Process(gateway.pid))  # CPU time only, its sampling thread not started
    cpu_start = gateway_cpu.cpu_seconds()
    rps = run_wrk(gateway.tls_url, script, args.threads, args.connections, args.duration)
    return rps, (gateway_cpu.cpu_seconds() - cpu_start) / (rps * args.duration) * 1e6


def agent_run(gateway: KongStandin, script: Path, args: argparse.Namespace, output: Path) -> dict:
    """One run with the agent: its requests/s, summary counters and whether the log matched the events."""
    log_offset = settled_log_size(gateway.access_log_path)
    command = [sys.executable, "-m", "agent", "--iface", "lo", "--port", str(gateway.port),
               "--tls-port", str(gateway.tls_port), "--credentials", str(DEFAULT_DECK_FILE),
               "--output", str(output)]
    agent, lines, reader = start_agent(command)
    if not any("metering HTTPS" in line for line in lines):
        agent.kill()
        raise RuntimeError("the agent could not meter HTTPS: " + "".join(lines))
    # CPU time only: the memory-sampling thread (smaps 10 times a second) would load the run it measures
    sampler = Sampler(psutil.Process(agent.pid))
    cpu_start = sampler.cpu_seconds()
    with ProgramTimes(agent.pid) if args.program_time else contextlib.nullcontext() as programs:
        rps, gateway_us = timed_load(gateway, script, args)
        program_ns = programs.since_start() if programs else None
    cpu_load = (sampler.cpu_seconds() - cpu_start) / args.duration
    catch_up = wait_idle(sampler, CATCH_UP_LIMIT)  # what the ring holds is read
    cpu_total = sampler.cpu_seconds() - cpu_start
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=30)
    reader.join(timeout=5)
    summaries = [line for line in lines if line.startswith("summary: ")]
    if agent.returncode != 0 or not summaries:
        raise RuntimeError(f"the agent exited {agent.returncode}: " + "".join(lines[-5:]))
    counters = {k: int(v) for k, v in (pair.split("=") for pair in summaries[-1].split()[1:])}
    time.sleep(0.5)  # nginx writes a line once its request is done
    entries = log_entries_from(gateway.access_log_path, log_offset)
    events = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    billed, metered = billed_rows(entries), metered_rows(events)
    matched = billed == metered and counters["rejected"] == sum(1 for e in entries if e["status"] == 401)
    if not matched:
        missing, extra = billed - metered, metered - billed
        print(f"  {sum(missing.values())} billed lines without an event, {sum(extra.values())} events without "
              f"a line; e.g. {list(missing)[:2]} {list(extra)[:2]}")
        print("  " + summaries[-1])
    requests = counters["requests"]
    return {"rps": rps, "gateway_us": gateway_us, "counters": counters, "matched": matched, "billed": sum(billed.values()),
            "events": len(events), "cpu_load": cpu_load, "catch_up": catch_up,
            "cpu_us": cpu_total / requests * 1e6 if requests else 0.0,
            "program_us": program_ns / (rps * args.duration) / 1e3 if program_ns is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved baseline/agent rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--new-connections", action="store_true",
                        help="a new connection (and TLS handshake) for every request, instead of keep-alive")
    parser.add_argument("--trap-floor", action="store_true",
                        help="also run the gateway with bare uprobes (no program) where the agent's probes sit")
    parser.add_argument("--program-time", action="store_true",
                        help="also count the run time of the agent's BPF programs (the kernel's BPF_ENABLE_STATS)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, \
            KongStandin(port=free_loopback_port(), tls_port=free_loopback_port()) as gateway:
        workdir = Path(scratch)
        script = workdir / "keys.lua"
        script.write_text(wrk_script([*list(gateway.consumers)[:3], INVALID_KEY], close=args.new_connections))
        run_wrk(gateway.tls_url, script, args.threads, args.connections, 1.0)  # warm up
        baselines, runs, floors = [], [], []
        for number in range(args.rounds):
            # the order turns each round, so that neither side always runs on a machine warmed by the other
            steps = ["alone", "agent", *(["floor"] if args.trap_floor else [])]
            for step in steps[number % len(steps):] + steps[:number % len(steps)]:
                if step == "alone":
                    baselines.append(timed_load(gateway, script, args))
                elif step == "agent":
                    runs.append(agent_run(gateway, script, args, workdir / f"events-{number}.jsonl"))
                else:
                    with BareTraps(gateway) as traps:
                        rps, us = timed_load(gateway, script, args)
                        floors.append((rps, us, traps.hits() / (rps * args.duration)))
            run = runs[-1]
            alone, alone_us = baselines[-1]
            programs = (f"; its BPF programs ran {run['program_us']:.1f} us per request"
                        if run["program_us"] is not None else "")
            floor = (f"; bare traps only {floors[-1][0]:,.0f} req/s ({floors[-1][0] / alone:.2f}; {floors[-1][1]:.1f} us, "
                     f"{floors[-1][2]:.2f} hits per request)") if floors else ""
            print(f"round {number + 1}: gateway alone {alone:,.0f} req/s ({alone_us:.1f} us of its CPU per request), "
                  f"with the agent {run['rps']:,.0f} req/s ({run['rps'] / alone:.2f}; {run['gateway_us']:.1f} us); "
                  f"{run['billed']:,} billed lines, {run['events']:,} "
                  f"events, matched={run['matched']}, ring drops {run['counters']['tls_ring_drops']}, unfollowed calls "
                  f"{run['counters']['tls_unfollowed_calls']}, truncated "
                  f"{run['counters']['tls_truncated_chunks']}; the agent used {run['cpu_load']:.2f} of a core during the "
                  f"load, caught up {run['catch_up']:.1f} s after it, {run['cpu_us']:.1f} us of CPU per request{programs}{floor}")
    kept = statistics.mean(run["rps"] for run in runs) / statistics.mean(rps for rps, _ in baselines)
    alone_us = statistics.mean(us for _, us in baselines)
    added_us = statistics.mean(run["gateway_us"] for run in runs) - alone_us
    lost = [run for run in runs if not run["matched"] or run["counters"]["tls_ring_drops"]
            or run["counters"]["tls_unfollowed_calls"] or run["counters"]["tls_truncated_chunks"]]
    reuse = "a new connection per request" if args.new_connections else "keep-alive"
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration:g}s over TLS ({reuse}), {args.rounds} "
          f"rounds: the gateway kept {kept:.2f} of its HTTPS throughput with the agent "
          f"(at least {KEPT_AT_LEAST:.2f}, goal {GOAL:.2f}); the gateway's CPU per request {alone_us:.1f} us alone, "
          f"{added_us:+.1f} us with the agent; runs that lost a request: {len(lost)}")
    if args.program_time:
        print(f"the agent's BPF programs ran {statistics.mean(run['program_us'] for run in runs):.1f} us per request "
              f"(their share of the CPU the agent added to the gateway's; the traps and the rest are the kernel's)")
    if floors:
        print(f"bare traps at the agent's probe sites, no program: the gateway kept "
              f"{statistics.mean(rps for rps, _, _ in floors) / statistics.mean(rps for rps, _ in baselines):.2f}, "
              f"{statistics.mean(us for _, us, _ in floors) - alone_us:+.1f} us of its CPU per request, "
              f"{statistics.mean(hits for _, _, hits in floors):.2f} hits per request")
    return 0 if kept >= KEPT_AT_LEAST and not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
