"""Delivery to a real HTTP ingest double on loopback: every event arrives, whatever the endpoint does.

Each test compares what the double accepted, by (source, id), with what was written: nothing missing,
nothing foreign; an id counted twice is only ever a re-send of that same event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent.backoff import Backoff
from agent.sink.ingest import DEAD_LETTER_FILE, IngestSettings, IngestSink, api_token_source
from agent.tokens import TokenSource
from tests.doubles.ingest import Fault, IngestDouble, json_lines, kong_events

TOKEN = "spat_test_0123456789abcdef"


@pytest.fixture
def double() -> Iterator[IngestDouble]:
    with IngestDouble(TOKEN) as running:
        yield running


@pytest.fixture(autouse=True)
def token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_API_TOKEN", TOKEN)


def make_sink(url: str, spool_dir: Path, token: TokenSource | None = None, **overrides) -> IngestSink:
    """A sink tuned for tests: short batching and backoff so failures resolve in well under a second."""
    settings = dict(batch_size=100, flush_interval=0.05, backoff=Backoff(0.02, 0.2), auth_retry_interval=0.2,
                    timeout=5.0, ack_timeout=30.0)
    settings.update(overrides)
    return IngestSink(IngestSettings(url, spool_dir, **settings), token or api_token_source())


def keys(events: list[dict]) -> set[tuple[str, str]]:
    return {(event["source"], event["id"]) for event in events}


def assert_all_delivered(double: IngestDouble, sent: list[dict]) -> None:
    accepted = double.accepted_counts()
    assert set(accepted) == keys(sent), "lost or foreign events"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def write_in_chunks(sink: IngestSink, events: list[dict], chunk: int = 37) -> None:
    for start in range(0, len(events), chunk):
        sink.write(json_lines(events[start:start + chunk]))


def test_events_arrive_in_batches_with_the_bearer_token_and_one_reused_connection(
        double: IngestDouble, tmp_path: Path) -> None:
    sent = kong_events(0, 1000)
    sink = make_sink(double.url, tmp_path)
    write_in_chunks(sink, sent)
    sink.close()
    assert_all_delivered(double, sent)
    assert sum(double.accepted_counts().values()) == 1000  # no failure, so no re-send
    assert {r.status for r in double.received} == {204}
    assert all(r.content_type == "application/cloudevents-batch+json" for r in double.received)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in double.received)
    assert max(r.events for r in double.received) <= 100
    assert len({r.peer for r in double.received}) == 1
    assert sink.counters()["delivered"] == 1000
    assert sink.counters()["pending"] == 0


def test_konnect_202_counts_as_acknowledged(double: IngestDouble, tmp_path: Path) -> None:
    sent = kong_events(0, 250)
    sink = make_sink(double.konnect_url, tmp_path)
    sink.write(json_lines(sent))
    sink.close()
    assert_all_delivered(double, sent)
    assert {r.status for r in double.received} == {202}


def test_a_partial_batch_goes_out_after_the_flush_interval_without_waiting_for_more(
        double: IngestDouble, tmp_path: Path) -> None:
    sent = kong_events(0, 3)
    sink = make_sink(double.url, tmp_path, batch_size=500, flush_interval=0.1)
    sink.write(json_lines(sent))
    wait_until(lambda: len(double.accepted) == 3)
    sink.close()
    assert_all_delivered(double, sent)


def test_a_burst_of_503_is_ridden_out(double: IngestDouble, tmp_path: Path) -> None:
    double.inject(Fault("status", 503, times=6))
    sent = kong_events(0, 500)
    sink = make_sink(double.url, tmp_path)
    write_in_chunks(sink, sent)
    sink.close()
    assert_all_delivered(double, sent)
    assert double.statuses()[:6] == [503] * 6
    assert sink.counters()["retried"] == 6


def test_429_waits_as_long_as_retry_after_says(double: IngestDouble, tmp_path: Path) -> None:
    double.inject(Fault("status", 429, retry_after="1"))
    sent = kong_events(0, 50)
    sink = make_sink(double.url, tmp_path)
    sink.write(json_lines(sent))
    sink.close()
    assert_all_delivered(double, sent)
    refused, retried = double.received[0], double.received[1]
    assert refused.status == 429
    assert retried.at - refused.at >= 0.95  # the computed backoff alone would be ~0.02 s


@pytest.mark.parametrize("retry_after", ["0", "Wed, 01 May 2024 09:00:00 GMT"])
def test_429_whose_retry_after_asks_for_no_wait_still_backs_off(
        double: IngestDouble, tmp_path: Path, retry_after: str) -> None:
    """A rate-limiting server saying "now" (0, or a date already past) must not be hammered."""
    double.inject(Fault("status", 429, retry_after=retry_after, times=4))
    sent = kong_events(0, 50)
    sink = make_sink(double.url, tmp_path, backoff=Backoff(0.1, 0.1))
    sink.write(json_lines(sent))
    sink.close()
    assert_all_delivered(double, sent)
    assert double.statuses()[:5] == [429] * 4 + [204]
    gaps = [later.at - earlier.at for earlier, later in zip(double.received, double.received[1:5])]
    assert min(gaps) >= 0.045  # the backoff's least wait (half of 0.1 s), not an immediate retry


def test_connection_resets_are_retried(double: IngestDouble, tmp_path: Path) -> None:
    double.inject(Fault("reset", times=4))
    sent = kong_events(0, 400)
    sink = make_sink(double.url, tmp_path)
    write_in_chunks(sink, sent)
    sink.close()
    assert_all_delivered(double, sent)
    assert double.statuses()[:4] == [0] * 4


def test_a_lost_acknowledgement_only_causes_a_resend_of_the_same_ids(double: IngestDouble, tmp_path: Path) -> None:
    double.inject(Fault("ack_lost", times=2))
    sent = kong_events(0, 300)
    sink = make_sink(double.url, tmp_path)
    write_in_chunks(sink, sent, chunk=100)
    sink.close()
    assert_all_delivered(double, sent)
    counts = double.accepted_counts()
    unanswered = sum(r.events for r in double.received if r.status == 0)
    assert unanswered > 0
    assert sum(counts.values()) - len(counts) == unanswered  # the re-sent batches, nothing else


def test_an_answer_slower_than_the_timeout_is_retried(double: IngestDouble, tmp_path: Path) -> None:
    double.inject(Fault("delay", delay=1.0, times=1))
    sent = kong_events(0, 200)
    sink = make_sink(double.url, tmp_path, timeout=0.3)
    sink.write(json_lines(sent))
    sink.close()
    assert_all_delivered(double, sent)
    assert sink.counters()["retried"] >= 1


def test_a_refused_token_is_reported_once_keeps_events_and_a_fixed_token_file_resumes(
        double: IngestDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.sink")
    token_file = tmp_path / "token"
    token_file.write_text("spat_expired_token\n")
    sent = kong_events(0, 300)
    sink = make_sink(double.url, tmp_path / "spool", api_token_source(token_file))
    sink.write(json_lines(sent))
    wait_until(lambda: double.statuses().count(401) >= 3)
    assert sink.counters()["pending"] == 300
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("spool-*.jsonl"))
    assert spooled.count(b'"id":"evt-') == 300
    assert b"spat_" not in spooled

    token_file.write_text(TOKEN + "\n")
    sink.close()
    assert_all_delivered(double, sent)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "401" in errors[0].getMessage()
    assert not any("spat_" in r.getMessage() for r in caplog.records)


def test_an_invalid_event_is_isolated_and_dead_lettered_and_its_batch_mates_delivered(
        double: IngestDouble, tmp_path: Path) -> None:
    sent = kong_events(0, 100)
    bad = sent[41]
    bad["time"] = "yesterday"  # passes the agent's own check, refused by the endpoint's schema
    double.reject_ids = {sent[77]["id"]}
    sink = make_sink(double.url, tmp_path)
    sink.write(json_lines(sent))
    sink.close()
    good = [e for e in sent if e["id"] not in (bad["id"], sent[77]["id"])]
    assert set(double.accepted_counts()) == keys(good)
    dead = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()]
    assert sorted(record["event"]["id"] for record in dead) == sorted([bad["id"], sent[77]["id"]])
    assert all(record["status"] == 400 and record["title"] == "Bad Request" for record in dead)
    assert any("time" in record["detail"] for record in dead)
    assert sink.counters()["dead_lettered"] == 2
    assert sink.counters()["delivered"] == 98


def test_an_event_missing_a_required_attribute_is_dead_lettered_without_a_request(
        double: IngestDouble, tmp_path: Path) -> None:
    (event,) = kong_events(0, 1)
    del event["subject"]
    sink = make_sink(double.url, tmp_path)
    sink.write(json_lines([event]))
    sink.close()
    assert double.received == []
    (record,) = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()]
    assert "subject" in record["reason"] and record["event"]["id"] == event["id"]


def test_live_capture_with_a_full_spool_refuses_new_events_loudly_and_keeps_the_spooled_ones(
        double: IngestDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    double.inject(Fault("status", 503, times=None))
    sent = kong_events(0, 200)  # about 700 bytes each, ten times the bound
    sink = make_sink(double.url, tmp_path, spool_max_bytes=16 * 1024, block_when_full=False)
    write_in_chunks(sink, sent, chunk=10)
    dropped = sink.counters()["dropped_full"]
    assert 0 < dropped < 200
    assert any(r.levelno == logging.ERROR and "spool full" in r.getMessage() for r in caplog.records)
    double.clear_faults()
    sink.close(wait_for_ack=True)
    assert_all_delivered(double, sent[:200 - dropped])  # the oldest were kept, the newest refused


def test_replay_with_a_full_spool_waits_for_room_and_loses_nothing(double: IngestDouble, tmp_path: Path) -> None:
    sent = kong_events(0, 2000)  # about 1.4 MB through a 32 KiB spool
    sink = make_sink(double.url, tmp_path, spool_max_bytes=32 * 1024, block_when_full=True, batch_size=20)
    write_in_chunks(sink, sent, chunk=50)
    sink.close()
    assert_all_delivered(double, sent)
    assert sink.counters()["dropped_full"] == 0


def test_what_is_spooled_is_sent_by_the_next_agent_after_an_outage(double: IngestDouble, tmp_path: Path) -> None:
    double.inject(Fault("status", 503, times=None))
    sent = kong_events(0, 300)
    first = make_sink(double.url, tmp_path)
    write_in_chunks(first, sent)
    first.close(wait_for_ack=False)
    assert first.counters()["pending"] == 300
    assert double.accepted == []

    double.clear_faults()
    second = make_sink(double.url, tmp_path)
    second.close()
    assert_all_delivered(double, sent)
    assert second.counters()["pending"] == 0
    assert list(tmp_path.glob("spool-*.jsonl")) == []


def test_waiting_for_acknowledgement_can_be_bounded(double: IngestDouble, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    double.inject(Fault("status", 503, times=None))
    sink = make_sink(double.url, tmp_path, ack_timeout=0.3)
    sink.write(json_lines(kong_events(0, 10)))
    sink.close()
    assert sink.counters()["pending"] == 10
    assert any("10 events stay in the spool" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_in_delivery_is_logged_and_delivery_resumes_from_the_unacknowledged_batch(
        double: IngestDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("agent.sink.ingest.UNEXPECTED_RETRY_SECONDS", 0.05)
    sent = kong_events(0, 300)
    sink = make_sink(double.url, tmp_path)
    real_send, failures = sink._send, []

    def send_failing_twice(lines):  # a bug, or a spool file gone, in the middle of a batch
        if len(failures) < 2:
            failures.append(len(lines))
            raise RuntimeError("unexpected")
        return real_send(lines)

    monkeypatch.setattr(sink, "_send", send_failing_twice)
    write_in_chunks(sink, sent)
    sink.close()
    assert failures == [100, 100]  # the same first batch, read again after the failure
    assert_all_delivered(double, sent)
    assert sink.counters()["pending"] == 0
    unexpected = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(unexpected) == 1  # at most once a minute


def test_a_problem_detail_echoing_the_token_is_logged_without_it(double: IngestDouble, tmp_path: Path) -> None:
    sink = make_sink(double.url, tmp_path)
    echoed = httpx.Response(400, headers={"Content-Type": "application/problem+json"},
                            content=json.dumps({"title": "Bad Request", "detail": f"got 'Bearer {TOKEN}'"}))
    answer = sink._classify(echoed)
    sink.close()
    assert TOKEN not in answer.reason and TOKEN not in (answer.detail or "")
    assert "[token]" in answer.reason
