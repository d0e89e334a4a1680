"""What a new user meets in the first hour (issue 13): a stop that says what it kept, a replay that gives
up on a dead endpoint, a damaged capture told apart from a good one, one-line errors for a mistyped path,
valid event ids, and a usage line that names every command."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from conftest import CAPTURES, REPO, one_line_error, read_events, run_agent

KONG = str(CAPTURES / "kong.yaml")
BASIC = str(CAPTURES / "nginx-basic.pcap")


# `agent --help`


def test_the_usage_line_names_agent_events():
    usage = run_agent("--help").stdout.split("\n\n", 1)[0]
    assert usage.startswith("usage: agent ")
    assert "agent events" in usage


# --output into a directory that does not exist


def test_output_in_a_missing_directory_is_one_line_naming_the_flag(tmp_path):
    target = tmp_path / "no" / "such" / "x.jsonl"
    result = run_agent("--read", BASIC, "--credentials", KONG, "--output", str(target),
                       "--log-level", "warning", check=False)
    assert result.returncode == 2
    assert one_line_error(result) == (f"agent: error: --output {target}: the directory {target.parent} "
                                      "does not exist")


def test_output_that_cannot_be_written_is_one_line_naming_the_flag(tmp_path):
    result = run_agent("--read", BASIC, "--credentials", KONG, "--output", str(tmp_path),
                       "--log-level", "warning", check=False)
    assert result.returncode == 2
    line = one_line_error(result)
    assert line.startswith(f"agent: error: --output {tmp_path}: cannot write there (") and "Errno" not in line


# a decK path that does not exist at live start


def test_live_capture_refuses_a_deck_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "kong.yml"
    result = subprocess.run([sys.executable, "-m", "agent", "--iface", "lo", "--port", "8000", "--credentials",
                             str(missing), "--output", str(tmp_path / "events.jsonl")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert one_line_error(result) == (f"agent: error: --credentials {missing}: no such file (a decK state file"
                                      " must exist when live capture starts)")
    assert not (tmp_path / "events.jsonl").exists()


# event ids


def test_event_ids_are_valid_version_8_uuids_stable_across_replays_and_distinct_per_request(tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    for output in (first, second):
        run_agent("--read", str(CAPTURES / "nginx-keepalive.pcap"), "--credentials", KONG, "--output", str(output))
    ids = [event["id"] for event in read_events(first)]
    assert len(ids) == len(set(ids)) > 10
    assert ids == [event["id"] for event in read_events(second)]
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 8 and parsed.variant == uuid.RFC_4122
