"""Every capture fixture, replayed as a user would, against its ground truth: events and counters exactly.

The fixtures cover what the reassembly and HTTP stages must get right (reordering, retransmission,
duplicates, mid-stream starts, lost segments, FIN/RST/half-close, thousands of connections, pipelining,
chunked bodies with trailers, 1xx, HEAD/204/304, close-delimited bodies, upgrades, header case,
malformed messages, every link type and file format); each truth file says what its capture exercises.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import CAPTURES, read_events, run_agent, summary

TRUTHS = sorted(CAPTURES.glob("*.truth.json"))


def expected_rows(truth: dict) -> Counter:
    return Counter((e["subject"], e["method"], e["uri"], e["status"], e["request_size"], e["response_size"])
                   for e in truth["events"])


def event_rows(events: list[dict]) -> Counter:
    return Counter((e["subject"], e["data"]["request_method"], e["data"]["request_uri"],
                    e["data"]["response_http_status"], e["data"]["request_size_bytes"],
                    e["data"]["response_size_bytes"]) for e in events)


def replay(truth: dict, tmp_path) -> tuple[list[dict], dict[str, int]]:
    output = tmp_path / "events.jsonl"
    ports = [arg for port in truth["ports"] for arg in ("--port", str(port))]
    result = run_agent("--read", str(CAPTURES / truth["capture"]), *ports, "--credentials",
                       str(CAPTURES / "kong.yaml"), *truth.get("args", []), "--output", str(output), check=False)
    assert result.returncode == truth.get("exit_status", 0), result.stderr  # 3: the capture lost packets
    return read_events(output), summary(result.stderr)


def test_there_are_fixtures_of_both_kinds():
    names = [path.name for path in TRUTHS]
    assert sum(name.startswith("nginx-") for name in names) >= 6
    assert sum(name.startswith("crafted-") for name in names) >= 20


@pytest.mark.parametrize("truth_file", TRUTHS, ids=[p.name.removesuffix(".truth.json") for p in TRUTHS])
def test_fixture_matches_its_truth(truth_file, tmp_path):
    truth = json.loads(truth_file.read_text())
    events, counters = replay(truth, tmp_path)
    assert event_rows(events) == expected_rows(truth)
    for name, value in truth.get("counters", {}).items():
        assert counters[name] == value, f"counter {name}"
    assert counters["events"] == len(truth["events"])
    assert len({e["id"] for e in events}) == len(events), "two requests share an event id"
