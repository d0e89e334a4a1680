"""The local store (the default sink) and `agent events`, which shows it like Konnect's Events tab."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.sink.events_command import events_command
from agent.sink.options import add_arguments, sink_from_args
from agent.sink.store import StoreSink
from tests.doubles.ingest import json_lines, kong_events


def store_with(path: Path, events: list[dict]) -> StoreSink:
    sink = StoreSink(path)
    sink.write(json_lines(events))
    return sink


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = events_command(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_replaying_the_same_events_twice_counts_each_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "events.sqlite3"
    events = kong_events(0, 30)
    sink = store_with(path, events)
    sink.close()
    again = store_with(path, events + kong_events(30, 3))  # the same capture, replayed, plus three new ones
    again.close()
    assert again.counters() == {"stored": 3, "duplicates": 30, "invalid": 0}
    code, out, _ = run(capsys, "--store", str(path), "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["total"] == 33
    assert shown["subjects"] == [{"subject": "alice", "count": 11}, {"subject": "bob", "count": 11},
                                 {"subject": "carol", "count": 11}]


def test_the_listing_shows_the_latest_events_first_and_the_count_per_subject(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "events.sqlite3"
    store_with(path, kong_events(0, 50)).close()
    code, out, _ = run(capsys, "--store", str(path), "--limit", "3")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "SUBJECT", "METHOD", "URI", "STATUS"]
    assert [line.split()[3] for line in lines[1:4]] == ["/orders?page=49", "/orders?page=48", "/orders?page=47"]
    assert lines[1].split() == ["2024-05-01T10:00:49.049Z", "bob", "GET", "/orders?page=49", "200"]
    counts = lines[lines.index("") + 1:]
    assert counts[0].split() == ["SUBJECT", "EVENTS"]
    assert {tuple(line.split()) for line in counts[1:4]} == {("alice", "17"), ("bob", "17"), ("carol", "16")}
    assert counts[-1] == "50 events, 3 subjects; the latest 3 listed."


def test_filters_by_subject_and_since(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "events.sqlite3"
    store_with(path, kong_events(0, 90)).close()  # 10:00:00 to 10:01:29
    code, out, _ = run(capsys, "--store", str(path), "--json", "--subject", "carol", "--since", "2024-05-01T10:01:00Z")
    shown = json.loads(out)
    assert code == 0
    assert shown["total"] == 10 and shown["subjects"] == [{"subject": "carol", "count": 10}]
    assert {event["subject"] for event in shown["events"]} == {"carol"}
    assert min(event["time"] for event in shown["events"]) >= "2024-05-01T10:01:00"


def test_since_accepts_a_look_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "events.sqlite3"
    now = datetime.now(timezone.utc)
    old, recent = kong_events(0, 2)
    old["time"] = (now - timedelta(hours=2)).isoformat()
    recent["time"] = (now - timedelta(minutes=1)).isoformat()
    store_with(path, [old, recent]).close()
    code, out, _ = run(capsys, "--store", str(path), "--json", "--since", "15m")
    assert code == 0
    assert [event["id"] for event in json.loads(out)["events"]] == [recent["id"]]


def test_the_listing_reads_while_the_agent_is_still_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "events.sqlite3"
    sink = store_with(path, kong_events(0, 5))
    code, out, _ = run(capsys, "--store", str(path), "--json")
    sink.write(json_lines(kong_events(5, 5)))
    code_later, out_later, _ = run(capsys, "--store", str(path), "--json")
    sink.close()
    assert (code, code_later) == (0, 0)
    assert json.loads(out)["total"] == 5 and json.loads(out_later)["total"] == 10


def test_an_event_the_store_cannot_key_is_skipped_and_counted(tmp_path: Path) -> None:
    event, = kong_events(0, 1)
    del event["id"]
    sink = store_with(tmp_path / "events.sqlite3", [event] + kong_events(1, 1))
    sink.close()
    assert sink.counters() == {"stored": 1, "duplicates": 0, "invalid": 1}


def test_no_store_yet_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "--data-dir", str(tmp_path / "nothing"))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "no local store" in err


def test_a_nonsense_since_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        events_command(["--store", str(tmp_path / "x"), "--since", "last tuesday"])
    assert exit_.value.code == 2
    assert "not a time" in capsys.readouterr().err


def test_without_output_or_endpoint_events_go_to_the_store_in_a_private_data_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "state" / "agent"
    monkeypatch.setenv("AGENT_DATA_DIR", str(data_dir))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sink = sink_from_args(parser.parse_args([]))
    sink.write(json_lines(kong_events(0, 4)))
    sink.close()
    assert isinstance(sink, StoreSink)
    assert os.stat(data_dir).st_mode & 0o777 == 0o700
    code, out, _ = run(capsys, "--json")  # finds it through $AGENT_DATA_DIR too
    assert code == 0 and json.loads(out)["total"] == 4


def test_the_default_data_dir_follows_env_then_root_then_the_user_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.sink.datadir import default_data_dir

    monkeypatch.setenv("AGENT_DATA_DIR", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("AGENT_DATA_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_data_dir() == Path("/var/lib/kong-metering-agent")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".local" / "share" / "kong-metering-agent"
