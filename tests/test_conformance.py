"""The public peer suite: Zeek's own HTTP test captures, with Zeek's transactions as the truth.

Each capture is replayed with the subject taken from the Host header, and (subject, method, uri, status)
must match what Zeek's http.log records. Where Zeek and the agent read the bytes differently, the
agent's reading is pinned in a test of its own below, with the reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import dpkt
import pytest

from conftest import SHARED, read_events, run_agent, summary

ZEEK = SHARED / "conformance" / "zeek"
MANIFEST = json.loads((ZEEK / "manifest.json").read_text()) if (ZEEK / "manifest.json").exists() else []


def replay(entry: dict, tmp_path) -> tuple[list[dict], dict[str, int]]:
    output = tmp_path / "events.jsonl"
    ports = [arg for port in entry["ports"] for arg in ("--port", str(port))]
    result = run_agent("--read", str(ZEEK / entry["capture"]), *ports, "--subject", "header:host",
                       "--output", str(output))
    return read_events(output), summary(result.stderr)


def as_rows(events: list[dict]) -> Counter:
    """Zeek logs the URI percent-decoded; the agent keeps it as sent (as Kong's request_uri does)."""
    return Counter((e["subject"], e["data"]["request_method"], unquote(e["data"]["request_uri"]),
                    e["data"]["response_http_status"]) for e in events)


ZEEK_EMPTY = {"(empty)": ""}  # how Zeek's logs spell an empty field


def truth_rows(entry: dict) -> Counter:
    lines = (ZEEK / entry["capture"].replace(".pcap", ".truth.jsonl")).read_text().splitlines()
    return Counter((row["consumer"], row["method"], ZEEK_EMPTY.get(row["uri"], row["uri"]), row["status"])
                   for row in map(json.loads, filter(None, lines)))


def test_the_peer_suite_is_there():
    assert len(MANIFEST) == 24, "../shared/conformance/zeek/manifest.json should list Zeek's 24 captures"


DISAGREEMENTS = {"http-methods"}


@pytest.mark.parametrize("entry", [e for e in MANIFEST if e["name"] not in DISAGREEMENTS],
                         ids=[e["name"] for e in MANIFEST if e["name"] not in DISAGREEMENTS])
def test_agrees_with_zeek(entry, tmp_path):
    events, counters = replay(entry, tmp_path)
    assert as_rows(events) == truth_rows(entry)
    assert counters["corrupt_packets"] == 0


def first_payloads(capture: Path, server_port: int) -> dict[int, tuple[bytes, bytes]]:
    """Per client port, the first request bytes and the first response bytes, read straight from the capture."""
    seen: dict[int, list[bytes]] = {}
    with open(capture, "rb") as handle:
        for _, frame in dpkt.pcap.Reader(handle):
            ip = dpkt.ethernet.Ethernet(frame).data
            tcp = ip.data
            if not isinstance(tcp, dpkt.tcp.TCP) or not tcp.data:
                continue
            if tcp.dport == server_port:
                seen.setdefault(tcp.sport, [b"", b""])[0] = seen.get(tcp.sport, [b"", b""])[0] or tcp.data
            elif tcp.sport == server_port:
                seen.setdefault(tcp.dport, [b"", b""])[1] = seen.get(tcp.dport, [b"", b""])[1] or tcp.data
    return {port: (request, response) for port, (request, response) in seen.items()}


def test_http_methods_requests_without_a_version_are_paired_with_the_status_the_server_sent(tmp_path):
    """Zeek reads `GET /HTTP/1.1` (no space before the version) as an HTTP/0.9 request and so expects a
    response without a status line; it logs status 0. The server, though, answered with a real status line
    (`HTTP/1.0 403 Forbidden`, `400 Bad Request`, ...): the agent pairs the request with that status. Every
    other transaction agrees with Zeek."""
    entry = next(e for e in MANIFEST if e["name"] == "http-methods")
    events, _ = replay(entry, tmp_path)
    truth, rows = truth_rows(entry), as_rows(events)
    zeek_unanswered = Counter({row: n for row, n in truth.items() if row[3] == 0})
    assert zeek_unanswered, "Zeek's truth should contain the HTTP/0.9 readings this test is about"
    assert rows - Counter({r: n for r, n in rows.items() if r[2] == "/HTTP/1.1"}) == truth - zeek_unanswered
    from_the_bytes = Counter()
    for request, response in first_payloads(ZEEK / entry["capture"], 80).values():
        request_line = request.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        if re.fullmatch(r"[A-Z_]+ /HTTP/1\.1", request_line) and response.startswith(b"HTTP/"):
            from_the_bytes[("www.google.com", request_line.split(" ")[0], "/HTTP/1.1", int(response[9:12]))] += 1
    assert Counter({r: n for r, n in rows.items() if r[2] == "/HTTP/1.1"}) == from_the_bytes
    assert sum(from_the_bytes.values()) == sum(zeek_unanswered.values())


def test_no_uri_is_an_empty_request_uri(tmp_path):
    """`OPTIONS HTTP/1.1` has no request target: Zeek logs "(empty)", the agent an empty request_uri."""
    entry = next(e for e in MANIFEST if e["name"] == "no-uri")
    events, _ = replay(entry, tmp_path)
    assert [e["data"]["request_uri"] for e in events] == [""]
