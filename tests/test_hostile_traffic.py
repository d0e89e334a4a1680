"""Hostile or careless input that a break-it pass found mishandled once: each test says what the agent
does with it now, and what it did before."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench_memory import PcapWriter, legitimate
from conftest import CAPTURES, REPO, summary

KONG = str(CAPTURES / "kong.yaml")
KEYS = (b"alice-key", b"bob-key", b"carol-key", b"m42-key")
ALICE = "alice-key-7f3a9c"
SYN, ACK, PSH = 0x02, 0x10, 0x08


def peak_rss(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """The agent run as a user runs it, and the peak memory of its whole process tree: each process's
    unique pages (forked workers share their parent's, which RSS would count once per process)."""
    process = subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, sum(p.memory_full_info().uss for p in [watched, *watched.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.01)
    stderr = process.stderr.read() if process.stderr else ""
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr), peak


def baseline_rss(tmp_path: Path, *args: str) -> int:
    """The same process tree on a capture with one exchange: interpreter, extension, sinks."""
    capture = tmp_path / "one.pcap"
    writer = PcapWriter(capture)
    legitimate(writer, 0)
    writer.close()
    return peak_rss("--read", str(capture), "--port", "8000", "--credentials", KONG, "--output", "-", *args)[1]


def test_after_a_pending_overflow_responses_are_not_paired_with_later_requests(tmp_path):
    """3,000 pipelined requests on one connection, then their 3,000 responses (each a distinct size). The
    queue of 1,024 waiting requests overflows twice and hands requests 0..2047 on unanswered; the responses
    that come next are theirs, counted late, and never paired with a later request (once 952 events carried
    another request's status and size)."""
    capture = tmp_path / "pipelined.pcap"
    writer = PcapWriter(capture)
    client, port, count = bytes([10, 9, 0, 1]), 40000, 3000
    requests = b"".join(b"GET /o%d?apikey=%s HTTP/1.1\r\nHost: api.example.com\r\n\r\n" % (i, ALICE.encode())
                        for i in range(count))
    responses = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (i, b"y" * i) for i in range(count))
    writer.segment(client, port, True, 1000, 0, SYN)
    writer.segment(client, port, False, 9000, 1001, SYN | ACK)
    for offset in range(0, len(requests), 1400):
        writer.segment(client, port, True, 1001 + offset, 9001, ACK | PSH, requests[offset:offset + 1400])
    client_end = 1001 + len(requests)
    for offset in range(0, len(responses), 1400):
        writer.segment(client, port, False, 9001 + offset, client_end, ACK | PSH, responses[offset:offset + 1400])
    writer.close()
    result = subprocess.run([sys.executable, "-m", "agent", "--read", str(capture), "--port", "8000",
                             "--credentials", KONG, "--output", "-"], capture_output=True, cwd=REPO, check=True)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == count
    mispaired = []
    for event in events:
        data = event["data"]
        index = int(data["request_uri"][2:])
        own = len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % index) + index
        if data["response_http_status"] != 0 and data["response_size_bytes"] != own:
            mispaired.append(data["request_uri"])
    assert mispaired == [], f"{len(mispaired)} events carry another request's response, e.g. {mispaired[:3]}"
    answered = [e["data"]["request_uri"] for e in events if e["data"]["response_http_status"] == 200]
    assert answered == [f"/o{index}" for index in range(2048, 3000)]  # the requests never handed on
    counts = summary(result.stderr.decode())
    assert counts["unanswered"] == counts["late_responses"] == 2048


def ooo_flood(path: Path, connections: int, held: int) -> None:
    """Each connection: a handshake, a one-byte hole, then `held` bytes out of order that never fill it."""
    writer = PcapWriter(path)
    for index in range(connections):
        client, port = bytes([11, 0, index >> 8, index & 0xFF]), 20000 + index
        writer.segment(client, port, True, 1000, 0, SYN)
        writer.segment(client, port, False, 9000, 1001, SYN | ACK)
        for offset in range(0, held, 1400):
            writer.segment(client, port, True, 1002 + offset, 9001, ACK, b"o" * 1400)
        if index % 10 == 0:
            legitimate(writer, index // 10)
    writer.close()


def test_workers_share_one_memory_budget(tmp_path):
    """`--max-memory` is one budget for the agent: `--workers N` share it (each got the whole of it once,
    543 MB peak for 256M and 2 workers)."""
    capture = tmp_path / "ooo.pcap"
    ooo_flood(capture, connections=300, held=900 * 1024)  # 270 MB out of order, never deliverable
    budget = 64 << 20
    args = ("--port", "8000", "--credentials", KONG, "--output", "-", "--max-memory", "64M", "--workers", "2")
    result, peak = peak_rss("--read", str(capture), *args)
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr)["internal_errors"] == 0
    above_baseline = peak - baseline_rss(tmp_path, *args[4:])
    assert above_baseline <= 1.15 * budget, f"{above_baseline >> 20} MB above the baseline for a 64 MB budget"


def test_a_flood_of_connections_stays_within_the_memory_budget(tmp_path):
    """One million SYNs (a connection each, nothing else) stay within the budget: it counts what the
    connection table really holds, its growth by doubling included (once it overshot by a fifth to a half)."""
    capture = tmp_path / "syn.pcap"
    writer = PcapWriter(capture)
    for index in range(1_000_000):
        writer.segment(bytes([13, index >> 16 & 0xFF, index >> 8 & 0xFF, index & 0xFF]), 20000 + index % 40000,
                       True, 1000, 0, SYN)
    writer.close()
    budget = 32 << 20
    args = ("--port", "8000", "--credentials", KONG, "--output", "-", "--max-memory", "32M")
    result, peak = peak_rss("--read", str(capture), *args)
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr)["shed_connections"] > 0
    above_baseline = peak - baseline_rss(tmp_path, *args[4:])
    assert above_baseline <= 1.15 * budget, f"{above_baseline >> 20} MB above the baseline for a 32 MB budget"


def test_overriding_key_names_does_not_let_a_header_subject_carry_api_keys():
    """`--key-names x --subject header:apikey` is refused like `--subject header:apikey`: the decK file says
    key-auth reads `apikey`, so its values are API keys (once every event's subject was the raw key)."""
    result = subprocess.run([sys.executable, "-m", "agent", "--read", str(CAPTURES / "crafted-pipelining.pcap"),
                             "--port", "8000", "--credentials", KONG, "--output", "-", "--key-names", "x",
                             "--subject", "header:apikey"], capture_output=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stdout == b""  # a usage error, as every refused option
    assert result.stderr.decode().strip().splitlines()[-1] == (
        "agent: error: --subject header:apikey would put API keys into events; choose another field")


def test_an_ipv6_atomic_fragment_is_metered(tmp_path):
    """An IPv6 packet with a Fragment header of offset 0 and M=0 is an atomic fragment (RFC 6946): the whole
    packet, which the gateway's kernel processes as such, and so does the agent (once it counted them in
    `ip_fragments` and dropped them)."""
    client, gateway = bytes.fromhex("20010db8000000000000000000000001"), bytes.fromhex("20010db8000000000000000000000010")
    request = f"GET /o?apikey={ALICE} HTTP/1.1\r\nHost: api.example.com\r\n\r\n".encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def packet(to_server: bool, seq: int, ack: int, flags: int, payload: bytes = b"") -> bytes:
        sport, dport = (40000, 8000) if to_server else (8000, 40000)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 65535, 0, 0) + payload
        fragment = struct.pack("!BBHI", 6, 0, 0, 0x1234)  # next header TCP, offset 0, M=0
        source, destination = (client, gateway) if to_server else (gateway, client)
        ip = struct.pack("!IHBB", 6 << 28, len(fragment) + len(tcp), 44, 64) + source + destination
        return ip + fragment + tcp

    frames = [packet(True, 1000, 0, SYN), packet(False, 9000, 1001, SYN | ACK),
              packet(True, 1001, 9001, ACK | PSH, request),
              packet(False, 9001, 1001 + len(request), ACK | PSH, response),
              packet(True, 1001 + len(request), 9001 + len(response), ACK)]
    capture = tmp_path / "atomic.pcap"
    with open(capture, "wb") as file:
        file.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 101))
        for index, frame in enumerate(frames):
            file.write(struct.pack("<IIII", 1_767_225_600, index * 1000, len(frame), len(frame)) + frame)
    result = subprocess.run([sys.executable, "-m", "agent", "--read", str(capture), "--port", "8000",
                             "--credentials", KONG, "--output", "-"], capture_output=True, cwd=REPO, check=True)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["subject"], e["data"]["request_uri"], e["data"]["response_http_status"]) for e in events] == [
        ("alice", "/o", 200)]
