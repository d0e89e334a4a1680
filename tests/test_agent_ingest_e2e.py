"""The real agent delivering a replayed capture to an ingest endpoint that follows OpenMeter's contract.

What a platform team checks: every billed request arrives once by (source, id), through outages and a
kill -9, and the agent says when it could not deliver.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import orjson

from conftest import CAPTURES, REPO, read_events, run_agent, summary
from tests.doubles.ingest import Fault, IngestDouble

TOKEN = "e2e-ingest-token"
KONG = str(CAPTURES / "kong.yaml")
INTERLEAVED = str(CAPTURES / "crafted-interleaved.pcap")


def expected_keys(capture: str, tmp_path) -> set[tuple[str, str]]:
    """(source, id) of what the agent emits for `capture`, from a plain JSON Lines replay."""
    output = tmp_path / "expected.jsonl"
    run_agent("--read", capture, "--credentials", KONG, "--output", str(output), "--source", "gw-test")
    return {(event["source"], event["id"]) for event in read_events(output)}


def agent_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "METERING_API_TOKEN": TOKEN, **extra}


def test_replay_is_acknowledged_through_503s_resets_and_429_before_exit_0(tmp_path):
    expected = expected_keys(INTERLEAVED, tmp_path)
    with IngestDouble(token=TOKEN) as ingest:
        ingest.inject(Fault("status", status=503, times=3), Fault("reset", times=2),
                      Fault("status", status=429, retry_after="1", times=1))
        result = run_agent("--read", INTERLEAVED, "--credentials", KONG, "--source", "gw-test",
                           "--ingest-endpoint", ingest.konnect_url, "--data-dir", str(tmp_path / "data"),
                           env=agent_env())
        accepted = ingest.accepted_counts()
    assert set(accepted) == expected
    assert summary(result.stderr)["pending"] == 0
    assert TOKEN not in result.stderr


def test_a_refused_token_is_one_error_line_and_the_agent_does_not_claim_delivery(tmp_path):
    with IngestDouble(token="the-right-token") as ingest:
        result = run_agent("--read", str(CAPTURES / "nginx-basic.pcap"), "--credentials", KONG,
                           "--ingest-endpoint", ingest.url, "--data-dir", str(tmp_path / "data"),
                           "--ack-timeout", "2", env=agent_env(), check=False)
    assert result.returncode == 1
    assert TOKEN not in result.stderr and "the-right-token" not in result.stderr
    assert "still in the spool" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "ERROR" in line and "401" in line]) == 1


def test_kill_9_mid_stream_loses_nothing_that_reached_the_spool(tmp_path):
    """The first agent's endpoint is down: events pile up in the spool until it is killed. A second agent
    on the same spool, replaying a different capture, must deliver the first one's spooled events too."""
    data = tmp_path / "data"
    first = subprocess.Popen(
        [sys.executable, "-m", "agent", "--read", INTERLEAVED, "--credentials", KONG, "--source", "gw-test",
         "--ingest-endpoint", "http://127.0.0.1:9/api/v1/events", "--data-dir", str(data)],
        cwd=REPO, env=agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    spool = data / "spool"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _spooled_ids(spool).__len__() < 1000:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    spooled = _spooled_ids(spool)
    assert len(spooled) >= 1000, "the first agent should have spooled events before it was killed"

    with IngestDouble(token=TOKEN) as ingest:
        run_agent("--read", str(CAPTURES / "nginx-basic.pcap"), "--credentials", KONG, "--source", "gw-test",
                  "--ingest-endpoint", ingest.url, "--data-dir", str(data), env=agent_env())
        accepted = ingest.accepted_counts()
    assert spooled <= set(accepted)
    assert all(count == 1 or key in spooled for key, count in accepted.items())


def _spooled_ids(spool) -> set[tuple[str, str]]:
    """Complete lines in the spool's segments (a line being written when killed is not yet spooled)."""
    keys = set()
    for segment in sorted(spool.glob("spool-*.jsonl")) if spool.exists() else []:
        for line in segment.read_bytes().split(b"\n")[:-1]:
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            keys.add((event["source"], event["id"]))
    return keys


def test_an_endpoint_refusing_every_event_as_invalid_is_not_a_successful_backfill(tmp_path):
    expected = expected_keys(str(CAPTURES / "nginx-basic.pcap"), tmp_path)
    with IngestDouble(token=TOKEN) as ingest:
        ingest.inject(Fault("status", status=400, times=None))
        result = run_agent("--read", str(CAPTURES / "nginx-basic.pcap"), "--credentials", KONG, "--source", "gw-test",
                           "--ingest-endpoint", ingest.url, "--data-dir", str(tmp_path / "data"),
                           env=agent_env(), check=False)
    assert result.returncode == 1
    assert f"refused {len(expected)} events as invalid" in result.stderr
    dead_letters = (tmp_path / "data" / "spool" / "dead-letter.jsonl").read_bytes()
    dead = [orjson.loads(line) for line in dead_letters.splitlines()]
    assert {(entry["event"]["source"], entry["event"]["id"]) for entry in dead} == expected


def test_dead_letters_past_the_first_few_are_logged_as_a_count_not_a_line_each(tmp_path):
    with IngestDouble(token=TOKEN) as ingest:
        ingest.inject(Fault("status", status=400, times=None))
        result = run_agent("--read", INTERLEAVED, "--credentials", KONG, "--ingest-endpoint", ingest.url,
                           "--data-dir", str(tmp_path / "data"), env=agent_env(), check=False)
    dead = summary(result.stderr)["dead_lettered"]
    assert result.returncode == 1 and dead > 1000
    assert len([line for line in result.stderr.splitlines() if "dead-lettered" in line]) < 20
