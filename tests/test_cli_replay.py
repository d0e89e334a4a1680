"""The replay command as a user meets it: its output, its summary line and its one-line errors."""

from __future__ import annotations

import gzip
import random
import json

import pytest

from agent._core import CaptureFile, ConnectionDealer, flow_hash
from conftest import CAPTURES, one_line_error, read_events, run_agent, summary

KONG = str(CAPTURES / "kong.yaml")
BASIC = str(CAPTURES / "nginx-basic.pcap")
KEYS = ["alice-key", "alice-key-7f3a9c", "bob-key-41d2e8", "carol-key-old-5b7e", "carol-key-new-9c1f", "m42-key-e6a0b3"]


def test_events_go_to_standard_output_with_a_dash(tmp_path):
    result = run_agent("--read", BASIC, "--credentials", KONG, "--output", "-")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    truth = json.loads((CAPTURES / "nginx-basic.truth.json").read_text())
    assert len(events) == len(truth["events"]) > 0
    assert {e["type"] for e in events} == {"kong.api_request"}
    assert all(e["specversion"] == "1.0" and e["datacontenttype"] == "application/json" for e in events)


def test_summary_line_counts_what_was_seen_and_lost():
    counters = summary(run_agent("--read", BASIC, "--credentials", KONG, "--output", "-").stderr)
    for name in ("packets", "connections", "requests", "events", "unresolved", "rejected", "gaps", "parse_errors",
                 "corrupt_packets"):
        assert name in counters
    assert counters["requests"] == counters["events"] + counters["rejected"] + counters["unresolved"]


def test_replaying_twice_gives_the_same_ids_and_two_requests_never_share_one(tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    capture = str(CAPTURES / "crafted-interleaved.pcap")
    run_agent("--read", capture, "--credentials", KONG, "--output", str(first))
    run_agent("--read", capture, "--credentials", KONG, "--output", str(second), "--workers", "2")
    ids = [e["id"] for e in read_events(first)]
    assert len(ids) == len(set(ids)) > 3000
    assert sorted(ids) == sorted(e["id"] for e in read_events(second))


def test_workers_split_the_connections_evenly_and_count_everything_once(tmp_path):
    capture = str(CAPTURES / "crafted-interleaved.pcap")
    flows: dict[int, set[int]] = {}
    dealer = ConnectionDealer(2)
    for batch in CaptureFile(capture).batches():
        for _, linktype, frame in batch:
            flows.setdefault(flow_hash(linktype, frame), set()).add(dealer(linktype, frame))
    assert all(len(owners) == 1 for owners in flows.values())  # a connection stays with one worker
    per_worker = [sum(1 for owners in flows.values() if owners == {share}) for share in (0, 1)]
    assert abs(per_worker[0] - per_worker[1]) <= 1 and sum(per_worker) > 10

    for capture, status in ((CAPTURES / "crafted-interleaved.pcap", 0), (CAPTURES / "crafted-corrupt.pcap", 3)):
        runs = [run_agent("--read", str(capture), "--credentials", KONG, "--output", "/dev/null", *workers,
                          check=False) for workers in ([], ["--workers", "2"])]
        assert [run.returncode for run in runs] == [status, status]
        one, two = (summary(run.stderr) for run in runs)
        assert two == one


def test_source_is_stable_and_can_be_set(tmp_path):
    output = tmp_path / "events.jsonl"
    run_agent("--read", BASIC, "--credentials", KONG, "--output", str(output), "--source", "gw-eu-1")
    assert {e["source"] for e in read_events(output)} == {"gw-eu-1"}


def test_subject_field_id_and_custom_id(tmp_path):
    output = tmp_path / "events.jsonl"
    run_agent("--read", str(CAPTURES / "crafted-http10-keepalive.pcap"), "--credentials", KONG,
              "--subject-field", "custom_id", "--output", str(output))
    subjects = {e["subject"] for e in read_events(output)}
    assert "cust-alice" in subjects and "alice" not in subjects


def test_subject_from_a_header(tmp_path):
    output = tmp_path / "events.jsonl"
    run_agent("--read", BASIC, "--subject", "header:host", "--output", str(output))
    events = read_events(output)
    assert {e["subject"] for e in events} == {"127.0.0.1:8000"}  # the header's value, as Kong's plugin takes it
    assert {e["data"]["subject_type"] for e in events} == {"header"}


def test_no_key_ever_reaches_the_output_or_the_log(tmp_path):
    for capture in ("nginx-basic.pcap", "nginx-keepalive.pcap", "crafted-header-case.pcap",
                    "crafted-status-codes.pcap"):
        output = tmp_path / "events.jsonl"
        result = run_agent("--read", str(CAPTURES / capture), "--credentials", KONG, "--output", str(output),
                           "--log-level", "debug")
        written = output.read_text() + result.stdout + result.stderr
        assert read_events(output)
        for key in KEYS + ["not-a-real-key"]:
            assert key not in written, f"{key} leaked from {capture}"


def test_a_truncated_capture_counts_the_cut_record_and_keeps_what_came_before(tmp_path):
    data = (CAPTURES / "nginx-basic.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) // 2 + 7])
    result = run_agent("--read", str(cut), "--credentials", KONG, "--output", str(tmp_path / "out.jsonl"),
                       check=False)
    assert result.returncode == 3  # damaged
    counters = summary(result.stderr)
    assert counters["corrupt_packets"] >= 1
    assert 0 < counters["events"] < 17


def test_gzip_compressed_capture(tmp_path):
    packed = tmp_path / "basic.pcap.gz"
    packed.write_bytes(gzip.compress((CAPTURES / "nginx-basic.pcap").read_bytes()))
    plain = summary(run_agent("--read", BASIC, "--credentials", KONG, "--output", "-").stderr)
    assert summary(run_agent("--read", str(packed), "--credentials", KONG, "--output", "-").stderr) == plain


def test_missing_file(tmp_path):
    line = one_line_error(run_agent("--read", str(tmp_path / "nope.pcap"), "--credentials", KONG, check=False))
    assert "nope.pcap" in line and "No such file" in line


def test_a_file_that_is_not_a_capture(tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_text("GET / HTTP/1.1\r\n\r\n")
    assert "not a pcap or pcapng capture" in one_line_error(run_agent("--read", str(junk), "--credentials", KONG,
                                                                      check=False))


def test_a_capture_cut_inside_its_file_header(tmp_path):
    short = tmp_path / "short.pcap"
    short.write_bytes((CAPTURES / "nginx-basic.pcap").read_bytes()[:10])
    one_line_error(run_agent("--read", str(short), "--credentials", KONG, check=False))


def test_a_credential_file_that_does_not_parse(tmp_path):
    broken = tmp_path / "kong.yaml"
    broken.write_text("consumers: [\n  - username: alice\n    keyauth_credentials: [{key: alice-key-7f3a9c}\n")
    line = one_line_error(run_agent("--read", BASIC, "--credentials", str(broken), check=False))
    assert "kong.yaml" in line and "alice-key-7f3a9c" not in line


def test_subject_from_the_key_header_is_refused():
    line = one_line_error(run_agent("--read", BASIC, "--subject", "header:apikey", check=False))
    assert "API keys" in line


def test_consumer_subject_needs_credentials():
    result = run_agent("--read", BASIC, check=False)
    assert result.returncode == 2 and "--credentials" in one_line_error(result)  # a usage error


@pytest.mark.parametrize("flag, value", [
    ("--max-connections", "0"), ("--response-timeout", "nan"), ("--idle-timeout", "-1"), ("--max-head-bytes", "12"),
    ("--port", "70000"), ("--batch-size", "0"), ("--credentials-refresh", "inf"), ("--workers", "x"),
    ("--key-names", " , "), ("--key-names", "apikey,api key"), ("--spool-max-bytes", "99999999999999999999T"),
    ("--source", ""), ("--read", ""),
])
def test_a_flag_value_out_of_range_is_one_line_before_anything_runs(tmp_path, flag, value):
    output = tmp_path / "events.jsonl"
    result = run_agent("--read", BASIC, "--credentials", KONG, "--output", str(output), flag, value, check=False)
    assert result.returncode == 2
    assert one_line_error(result).startswith(f"agent: error: argument {flag}: ")
    assert not output.exists()


def test_a_damaged_local_store_is_one_line_not_a_traceback(tmp_path):
    run_agent("--read", str(CAPTURES / "nginx-keepalive.pcap"), "--credentials", KONG, "--data-dir", str(tmp_path))
    store = tmp_path / "events.sqlite3"
    damaged = bytearray(store.read_bytes())
    noise = random.Random(4)
    damaged[4096:] = bytes(noise.randrange(256) for _ in range(len(damaged) - 4096))  # the schema page survives
    store.write_bytes(damaged)
    result = run_agent("--read", BASIC, "--credentials", KONG, "--data-dir", str(tmp_path), "--log-level", "warning",
                       check=False)
    assert "local store" in one_line_error(result) or "data directory" in one_line_error(result)


def test_output_never_overwrites_the_capture_or_the_credentials(tmp_path):
    capture, deck = tmp_path / "capture.pcap", tmp_path / "kong.yaml"
    capture.write_bytes((CAPTURES / "nginx-basic.pcap").read_bytes())
    deck.write_text((CAPTURES / "kong.yaml").read_text())
    for target, flag in ((capture, "--read"), (deck, "--credentials")):
        result = run_agent("--read", str(capture), "--credentials", str(deck), "--output", str(target),
                           "--log-level", "warning", check=False)
        assert one_line_error(result).endswith(f"is the {flag} file; it would be overwritten")
    assert capture.read_bytes() == (CAPTURES / "nginx-basic.pcap").read_bytes()
    assert deck.read_text() == (CAPTURES / "kong.yaml").read_text()
