"""Packets lost in both directions of a keep-alive connection (a ring that overflowed, a capture that
dropped): every request billed after the loss is billed with its own answer, never its neighbour's.

The capture is tcpdump's of nginx (the key-auth stand-in) answering one keep-alive client; the losses are
runs of consecutive packets taken out of it, as a full ring takes them: requests and answers together.
The truth is nginx's access log. Needs root (tcpdump on loopback).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dpkt
import httpx
import pytest
from kong_standin import KongStandin, free_loopback_port, load_consumers

from conftest import CAPTURES, read_events, run_agent, summary

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: tcpdump")]

DECK = CAPTURES / "kong.yaml"
KEY = next(key for key, (subject, _) in load_consumers(DECK).items() if subject == "alice")
REQUESTS = 60


def target(number: int) -> str:
    """Each request its own URI, and answers of different sizes and statuses, so that an answer paired with
    the wrong request shows."""
    if number % 5 == 3:
        return f"/status/404?n={number}"
    return f"/items/{number}" + "x" * (number % 7)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, int, dict[str, dict]]:
    """(the capture, the gateway's port, its log entries by URI)."""
    workdir = tmp_path_factory.mktemp("lost-packets")
    capture = workdir / "keepalive.pcap"
    with KongStandin(port=free_loopback_port()) as gateway:
        # a ring of its own as large as the live tests' tcpdump's: libpcap's default, in immediate mode with
        # -s 0, holds a handful of loopback frames, and a busy host made it drop some (a fresh-clone CI run)
        tcpdump = subprocess.Popen(["tcpdump", "-i", "lo", "-s", "0", "-B", str(256 << 10), "-U", "--immediate-mode",
                                    "-w", str(capture), "tcp", "port", str(gateway.port)],
                                   stderr=subprocess.PIPE, text=True)
        try:
            assert tcpdump.stderr is not None
            assert "listening on" in tcpdump.stderr.readline()
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            with httpx.Client(base_url=gateway.base_url, limits=limits, timeout=10) as client:
                for number in range(REQUESTS):
                    if number % 4 == 1:
                        client.post(target(number), headers={"apikey": KEY}, content=b"y" * (10 + number))
                    else:
                        client.get(target(number), headers={"apikey": KEY})
            entries = gateway.access_log_entries(expect=REQUESTS)
        finally:
            time.sleep(0.3)
            tcpdump.send_signal(signal.SIGINT)
            tcpdump.wait(10)
        assert tcpdump.stderr is not None
        assert "\n0 packets dropped by kernel" in tcpdump.stderr.read()
        return capture, gateway.port, {entry["request_uri"]: entry for entry in entries}


def packets(capture: Path) -> tuple[list[tuple[float, bytes]], int]:
    with open(capture, "rb") as handle:
        reader = dpkt.pcap.Reader(handle)
        return [(float(timestamp), bytes(frame)) for timestamp, frame in reader], reader.datalink()


def request_starts(frames: list[tuple[float, bytes]], linktype: int) -> list[int]:
    """The index of the packet each request begins in, in order (one connection, one request at a time)."""
    starts = []
    for index, (_, frame) in enumerate(frames):
        ip = dpkt.ethernet.Ethernet(frame).data if linktype == dpkt.pcap.DLT_EN10MB else dpkt.ip.IP(frame)
        payload = bytes(ip.data.data)
        if payload.startswith((b"GET ", b"POST ")):
            starts.append(index)
    assert len(starts) == REQUESTS
    return starts


@pytest.mark.parametrize("first_request, offset, length", [
    (10, 0, 2),    # from a request's first packet: it and its answer
    (10, 1, 3),    # from inside an exchange into the next request
    (25, 6, 8),    # answers and requests, ending inside an exchange
    (40, 3, 15),   # several exchanges, beginning inside one
])
def test_every_request_billed_after_a_loss_in_both_directions_has_its_own_answer(
        recorded, tmp_path: Path, first_request: int, offset: int, length: int) -> None:
    capture, port, log = recorded
    frames, linktype = packets(capture)
    starts = request_starts(frames, linktype)
    lost = set(range(starts[first_request] + offset, starts[first_request] + offset + length))
    damaged = tmp_path / "damaged.pcap"
    with open(damaged, "wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=linktype)
        for index, (timestamp, frame) in enumerate(frames):
            if index not in lost:
                writer.writepkt(frame, ts=timestamp)
    output = tmp_path / "events.jsonl"
    result = run_agent("--read", str(damaged), "--port", str(port), "--credentials", str(DECK),
                       "--output", str(output), check=False)
    counters = summary(result.stderr)
    assert counters["gaps"] > 0, "the loss is counted"
    assert counters["paired_in_doubt"] == 0, "a client that waits for each answer is paired by its ACKs"
    events = read_events(output)

    billed = {}
    for event in events:
        data = event["data"]
        entry = log[data["request_uri"]]
        billed[data["request_uri"]] = (data["response_http_status"], data["response_size_bytes"],
                                       data["request_size_bytes"])
        assert billed[data["request_uri"]] == (entry["status"], entry["bytes_sent"], entry["request_length"]), \
            (data["request_uri"], counters)
    # each request none of whose packets (from its first to the next request's first) was lost is billed
    bounds = zip(starts, [*starts[1:], len(frames)])
    whole = [target(number) for number, (begin, end) in enumerate(bounds) if not lost & set(range(begin, end))]
    missing = [uri for uri in whole if uri not in billed]
    assert not missing, (missing, counters)
    assert len(events) < REQUESTS
