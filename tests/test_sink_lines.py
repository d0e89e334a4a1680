"""Every sink takes events as JSON Lines bytes and passes them on byte for byte, never re-encoded.

The lines below are written the way no Python encoder would write them (literal UTF-8 beside a `\\u` escape,
an exponent, `data` before the attributes) so that a sink that decoded and re-encoded them would show it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from multiprocessing import Pipe
from pathlib import Path

import pytest

from agent.backoff import Backoff
from agent.sink.ingest import DEAD_LETTER_FILE, IngestSettings, IngestSink, api_token_source
from agent.sink.jsonl import JsonLinesSink
from agent.sink.spool import Spool
from agent.sink.store import StoreSink
from agent.workers import receive, send_counters, send_events
from tests.doubles.ingest import IngestDouble, json_lines, kong_events

TOKEN = "spat_test_0123456789abcdef"
ODD_LINES = [
    '{"data":{"request_uri":"/caf\u00e9","request_method":"GET","response_http_status":200,"latency_ms":1.5e3},'
    '"specversion":"1.0","id":"odd-1","source":"kong-metering-agent/test","type":"kong.api_request",'
    '"subject":"z\u00fcrich","time":"2024-05-01T10:00:00.000Z","datacontenttype":"application/json"}',
    '{"specversion":"1.0","id":"odd-2","source":"kong-metering-agent/test","type":"kong.api_request",'
    '"subject":"caf\\u00e9","time":"2024-05-01T10:00:01Z","datacontenttype":"application/json",'
    '"data":{"request_uri":"/a\\/b","request_method":"POST","response_http_status":201}}',
]
LINES = [line.encode() for line in ODD_LINES] + [line.rstrip(b"\n") for line in
                                                  json_lines(kong_events(0, 3)).splitlines(keepends=True)]
GIVEN = b"".join(line + b"\n" for line in LINES)


@pytest.fixture
def double() -> Iterator[IngestDouble]:
    with IngestDouble(TOKEN) as running:
        yield running


@pytest.fixture(autouse=True)
def token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_API_TOKEN", TOKEN)


def ingest_sink(url: str, spool_dir: Path) -> IngestSink:
    return IngestSink(IngestSettings(url, spool_dir, batch_size=100, flush_interval=0.05, backoff=Backoff(0.02, 0.2),
                                     timeout=5.0, ack_timeout=30.0), api_token_source())


def test_the_json_lines_sink_writes_exactly_the_lines_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(path))
    sink.write(GIVEN[:len(LINES[0]) + 1])
    sink.write(GIVEN[len(LINES[0]) + 1:])
    sink.close()
    assert path.read_bytes() == GIVEN


def test_the_store_keeps_each_event_as_the_line_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    sink = StoreSink(path)
    sink.write(GIVEN)
    sink.close()
    assert sink.counters() == {"stored": 5, "duplicates": 0, "invalid": 0}
    with sqlite3.connect(path) as db:
        stored = dict(db.execute("SELECT id, event FROM events"))
        odd = db.execute("SELECT subject, uri, status FROM events WHERE id = 'odd-1'").fetchone()
    assert sorted(stored.values()) == sorted(line.decode() for line in LINES)
    assert odd == ("z\u00fcrich", "/caf\u00e9", 200)


def test_the_ingest_sink_sends_exactly_the_lines_it_is_given(double: IngestDouble, tmp_path: Path) -> None:
    sink = ingest_sink(double.url, tmp_path)
    sink.write(GIVEN)
    sink.close()
    (request,) = double.received
    assert request.body == b"[" + b",".join(LINES) + b"]"
    assert sink.counters()["delivered"] == 5


def test_the_spool_gives_back_exactly_the_lines_appended(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    assert spool.append(GIVEN, block=False) == 0  # none refused
    assert spool.read_batch(100).lines == LINES
    spool.close()


def test_a_worker_pipe_carries_the_lines_as_they_are_and_the_counters_apart() -> None:
    reader, writer = Pipe(duplex=False)
    send_events(writer, GIVEN)
    send_counters(writer, {"events": 5})
    totals = {"events": 1}
    assert receive(reader.recv_bytes(), totals) == GIVEN
    assert receive(reader.recv_bytes(), totals) is None
    assert totals == {"events": 6}


def test_an_empty_batch_changes_nothing_in_any_sink(double: IngestDouble, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    jsonl = JsonLinesSink(str(path))
    jsonl.write(b"")
    jsonl.close()
    assert path.read_bytes() == b""

    store = StoreSink(tmp_path / "events.sqlite3")
    store.write(b"")
    store.close()
    assert store.counters() == {"stored": 0, "duplicates": 0, "invalid": 0}

    spool = Spool(tmp_path / "spool", 1 << 20)
    assert spool.append(b"", block=False) == 0
    assert spool.bytes_used == 0 and spool.pending_events == 0
    spool.close()

    ingest = ingest_sink(double.url, tmp_path / "ingest")
    ingest.write(b"")
    assert ingest.counters()["spooled_bytes"] == 0 and ingest.counters()["pending"] == 0
    ingest.close()
    assert double.received == []
    assert ingest.counters()["delivered"] == 0


def test_a_last_line_without_its_newline_still_counts(double: IngestDouble, tmp_path: Path) -> None:
    store = StoreSink(tmp_path / "events.sqlite3")
    store.write(GIVEN.rstrip(b"\n"))
    store.close()
    assert store.counters()["stored"] == 5
    ingest = ingest_sink(double.url, tmp_path / "ingest")
    ingest.write(GIVEN.rstrip(b"\n"))
    ingest.close()
    assert sum(double.accepted_counts().values()) == 5


def test_a_line_that_is_not_a_json_object_is_dead_lettered_before_any_request_and_its_neighbours_sent(
        double: IngestDouble, tmp_path: Path) -> None:
    sink = ingest_sink(double.url, tmp_path)
    sink.write(LINES[0] + b"\n[1,2]\n\n" + LINES[1] + b"\n")
    sink.close()
    assert set(double.accepted_counts()) == {("kong-metering-agent/test", "odd-1"), ("kong-metering-agent/test", "odd-2")}
    assert all(b"[1,2]" not in request.body for request in double.received)
    dead = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()]
    assert [record["event"] for record in dead] == [[1, 2], ""]
    assert all(record["reason"].startswith("not a JSON object") for record in dead)
    assert sink.counters()["dead_lettered"] == 2 and sink.counters()["pending"] == 0


def test_a_line_that_is_not_json_is_dead_lettered_before_any_request(double: IngestDouble, tmp_path: Path) -> None:
    sink = ingest_sink(double.url, tmp_path)
    sink.write(b'{"id":"broken",}\n')
    sink.close()
    assert double.received == []
    (record,) = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()]
    assert record["event"] == '{"id":"broken",}' and record["reason"].startswith("not valid JSON")
    assert sink.counters()["dead_lettered"] == 1 and sink.counters()["pending"] == 0


def test_an_event_larger_than_the_spool_is_dead_lettered_and_the_others_spooled(
        double: IngestDouble, tmp_path: Path) -> None:
    (event,) = kong_events(0, 1)
    event["data"]["request_uri"] = "/" + "x" * 8192
    sink = IngestSink(IngestSettings(double.url, tmp_path, spool_max_bytes=4096, flush_interval=0.05,
                                     ack_timeout=30.0), api_token_source())
    sink.write(json_lines([event]) + GIVEN)
    sink.close()
    assert sink.counters()["dead_lettered"] == 1 and sink.counters()["delivered"] == 5
    (record,) = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()]
    assert "larger than the spool" in record["reason"] and record["event"]["id"] == event["id"]
