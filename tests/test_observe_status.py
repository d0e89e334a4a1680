"""Monitoring's sums and families, from the reports the capture loops send: a worker's restart never makes a
total go down, a counter the summary line gains shows up by itself, and the spool's oldest event has an age."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kong_standin import free_loopback_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.backoff import Backoff
from agent.observe.exposition import LEVELS as GAUGES
from agent.observe.exposition import AgentCollector
from agent.observe.health import Health
from agent.observe.status import LEVELS, LiveStatus, Report
from agent.sink.ingest import IngestSettings, IngestSink, api_token_source
from agent.sink.jsonl import JsonLinesSink
from tests.doubles.ingest import IngestDouble, json_lines, kong_events


def report(pid: int = 1, **counters: int) -> Report:
    return {"counters": counters, "ring_fill": 0.25, "tables": {}, "pid": pid}


def scrape(status: LiveStatus, sink) -> dict[tuple[str, tuple], float]:
    """Every sample as the Prometheus parser reads the exposition: (name, labels) -> value."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(status, sink))
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_workers_are_summed_and_a_restarted_worker_never_makes_a_total_go_down() -> None:
    status = LiveStatus(workers=2)
    status.update(1, report(requests=10, events=8, rejected=2))
    status.update(2, report(requests=5, events=5, rejected=0))
    assert status.totals() == {"requests": 15, "events": 13, "rejected": 2}
    status.update(2, report(requests=7, events=6, rejected=1))
    assert status.totals() == {"requests": 17, "events": 14, "rejected": 3}
    status.update(2, report(requests=1, events=1, rejected=0))  # worker 2 restarted: it counts from zero again
    assert status.totals() == {"requests": 18, "events": 15, "rejected": 3}
    status.update(2, report(requests=4, events=3, rejected=1))
    assert status.totals() == {"requests": 21, "events": 17, "rejected": 4}


def test_levels_are_kept_as_reported_and_one_falling_is_no_restart(tmp_path: Path) -> None:
    """A gateway's reload ends old workers: the TLS probes' processes fall, the counts must not double."""
    status = LiveStatus(workers=1)
    status.update(1, report(requests=1000, tls_chunks=2000, tls_processes=3, tls_library_read_processes=2))
    status.update(1, report(requests=1010, tls_chunks=2020, tls_processes=2, tls_library_read_processes=1))
    assert status.totals() == {"requests": 1010, "tls_chunks": 2020, "tls_processes": 2,
                               "tls_library_read_processes": 1}
    status.update(1, report(requests=5, tls_chunks=10, tls_processes=3, tls_library_read_processes=0))  # restarted
    assert status.totals() == {"requests": 1015, "tls_chunks": 2030, "tls_processes": 3,
                               "tls_library_read_processes": 0}
    samples = scrape(status, JsonLinesSink(str(tmp_path / "events.jsonl")))
    assert samples[("agent_tls_processes", ())] == 3 and samples[("agent_tls_library_read_processes", ())] == 0
    assert samples[("agent_tls_chunks_total", ())] == 2030
    assert ("agent_lost_total", (("reason", "tls_processes"),)) not in samples
    assert LEVELS <= GAUGES.keys()  # every level a worker reports is exposed as a gauge


def test_every_summary_counter_is_exposed_and_a_new_kind_of_loss_needs_no_change(tmp_path: Path) -> None:
    status = LiveStatus(workers=1)
    status.update(1, report(requests=9, events=6, rejected=2, kernel_drops=1, gap_bytes=100,
                            no_such_counter_yet=1))  # a counter the summary line gains later
    samples = scrape(status, JsonLinesSink(str(tmp_path / "events.jsonl")))
    assert samples[("agent_requests_total", ())] == 9
    assert samples[("agent_events_total", ())] == 6
    assert samples[("agent_gap_bytes_total", ())] == 100
    assert samples[("agent_lost_total", (("reason", "rejected"),))] == 2
    assert samples[("agent_lost_total", (("reason", "kernel_drops"),))] == 1
    assert samples[("agent_lost_total", (("reason", "no_such_counter_yet"),))] == 1
    assert samples[("agent_worker_kernel_drops_total", (("worker", "1"),))] == 1
    assert samples[("agent_worker_ring_fill_ratio", (("worker", "1"),))] == 0.25
    assert samples[("agent_cpu_seconds_total", ())] > 0


def test_tables_show_the_stalest_worker_and_readiness_waits_for_every_one(tmp_path: Path) -> None:
    status = LiveStatus(workers=2)
    sink = JsonLinesSink(str(tmp_path / "events.jsonl"))
    health = Health(status, sink, stopping=lambda: False)
    assert health.liveness().reasons == ["worker 1 not started yet", "worker 2 not started yet"]
    loaded = time.time() - 30
    status.update(1, {**report(), "tables": {"credentials": {"entries": 6, "loaded_at": loaded}}})
    status.update(2, {**report(), "tables": {"credentials": {"entries": 0, "loaded_at": None}}})
    assert health.liveness().ok
    assert health.readiness().reasons == ["credentials table not loaded yet"]
    samples = scrape(status, sink)
    assert samples[("agent_table_loaded", (("table", "credentials"),))] == 0
    status.update(2, {**report(), "tables": {"credentials": {"entries": 6, "loaded_at": loaded + 20}}})
    assert health.readiness().ok
    samples = scrape(status, sink)
    assert samples[("agent_table_entries", (("table", "credentials"),))] == 6
    assert 29 <= samples[("agent_table_age_seconds", (("table", "credentials"),))] < 60


def ingest_sink(url: str, spool: Path) -> IngestSink:
    settings = IngestSettings(url, spool, batch_size=100, flush_interval=0.05, backoff=Backoff(0.05, 0.2),
                              timeout=2.0, connect_timeout=1.0)
    return IngestSink(settings, api_token_source())


def test_the_spools_oldest_event_has_an_age_until_it_is_delivered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("METERING_API_TOKEN", "spat_test_token")
    status = LiveStatus(workers=1)
    events = kong_events(0, 3)
    written = datetime.now(timezone.utc) - timedelta(seconds=90)
    for event in events:
        event["time"] = written.isoformat().replace("+00:00", "Z")
    down = f"http://127.0.0.1:{free_loopback_port()}/api/v1/events"  # nothing listens there
    sink = ingest_sink(down, tmp_path / "spool")
    sink.write(json_lines(events))
    deadline = time.monotonic() + 10
    while not sink.batches_by_status().get("no_answer") and time.monotonic() < deadline:
        time.sleep(0.05)
    samples = scrape(status, sink)
    sink.close(wait_for_ack=False)
    assert 90 <= samples[("agent_spool_oldest_event_age_seconds", ())] < 120
    assert samples[("agent_spool_events", ())] == 3
    assert samples[("agent_spool_bytes", ())] == len(json_lines(events))
    assert samples[("agent_delivery_batches_total", (("status_class", "no_answer"),))] >= 1

    with IngestDouble("spat_test_token") as double:  # the next start delivers them
        sink = ingest_sink(double.url, tmp_path / "spool")
        sink.close()
        samples = scrape(status, sink)
    assert ("agent_spool_oldest_event_age_seconds", ()) not in samples
    assert samples[("agent_delivery_batches_total", (("status_class", "2xx"),))] == 1
    assert samples[("agent_delivered_total", ())] == 3
