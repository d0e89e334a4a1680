"""`--metrics-listen` end to end: the agent capturing nginx on loopback is scraped while it runs, and what
/metrics says (read with prometheus_client's own parser) is checked against nginx's access log and the
agent's own summary line; /healthz and /readyz answer as a supervisor needs. Needs root (packet sockets).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import httpx
import pytest
import yaml
from kong_standin import billed_rows, free_loopback_port
from prometheus_client.parser import text_string_to_metric_families

from agent.observe.exposition import LEVELS, NOT_LOSSES
from conftest import one_line_error, run_agent
from tests.doubles.ingest import Fault, IngestDouble
from tests.test_live_e2e import DECK, INGEST_TOKEN, KEYS, drive_clients, gateway, start_agent  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packet sockets")]

Samples = dict[tuple[str, tuple], float]


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def probe(port: int, path: str) -> tuple[int, dict]:
    response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    return response.status_code, response.json()


def wait_ready(port: int, timeout: float = 10.0) -> None:
    """Until /readyz says so (a worker reports its table within a second of loading it)."""
    deadline = time.monotonic() + timeout
    while (answer := probe(port, "/readyz")) != (200, {"status": "ok"}):
        assert time.monotonic() < deadline, f"never ready: {answer}"
        time.sleep(0.2)


def wait_for_scrape(port: int, done, timeout: float = 15.0) -> Samples:
    """Scrape until `done(samples)` (the workers report once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if done(samples):
            return samples
        assert time.monotonic() < deadline, f"the scrape never got there: {samples}"
        time.sleep(0.3)


def summary_series(name: str) -> tuple[str, tuple]:
    """Where a counter of the summary line is in the exposition."""
    if name in LEVELS:
        return "agent_" + LEVELS[name][0], ()
    if name in NOT_LOSSES:
        return f"agent_{name}_total", ()
    return "agent_lost_total", (("reason", name),)


def test_a_scrape_during_live_capture_agrees_with_the_access_log_and_the_summary_line(
        gateway, start_agent, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("METERING_API_TOKEN", INGEST_TOKEN)
    metrics = free_loopback_port()
    with IngestDouble(INGEST_TOKEN) as double:
        agent = start_agent(gateway.port, "--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics}",
                            "--ingest-endpoint", double.url, "--data-dir", str(tmp_path / "data"),
                            "--flush-interval", "0.1", to_file=False)
        assert probe(metrics, "/healthz") == (200, {"status": "ok"})
        wait_ready(metrics)
        sent = drive_clients(gateway, tmp_path)
        entries = gateway.access_log_entries(expect=sent)
        billed = sum(billed_rows(entries).values())
        rejected = sum(1 for entry in entries if entry["status"] == 401)
        samples = wait_for_scrape(metrics, lambda s: s[("agent_requests_total", ())] == sent
                                  and s[("agent_delivered_total", ())] == billed)
        code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr

    # against the gateway's own log
    assert samples[("agent_events_total", ())] == billed
    assert samples[("agent_lost_total", (("reason", "rejected"),))] == rejected
    assert samples[("agent_delivery_batches_total", (("status_class", "2xx"),))] >= 1
    assert samples[("agent_spool_events", ())] == 0
    # against the summary line: every counter of it is there, with the same value (the spool's levels are
    # there too, but its bytes are reclaimed at the stop)
    final = agent.summary()
    for name, value in final.items():
        assert summary_series(name) in samples, name
        if name not in LEVELS:
            assert samples[summary_series(name)] == value, name
    # per worker, the tables, the process
    for worker in ("1", "2"):
        assert samples[("agent_worker_kernel_drops_total", (("worker", worker),))] == 0
        assert 0 <= samples[("agent_worker_ring_fill_ratio", (("worker", worker),))] <= 1
        assert samples[("agent_worker_report_age_seconds", (("worker", worker),))] < 5
    keys = sum(len(keys) for keys in KEYS.values())
    assert samples[("agent_table_entries", (("table", "credentials"),))] == keys
    assert samples[("agent_table_loaded", (("table", "credentials"),))] == 1
    assert 0 <= samples[("agent_table_age_seconds", (("table", "credentials"),))] < 60
    deck = yaml.safe_load(DECK.read_text())
    routes = sum(len(service.get("routes", [])) for service in deck["services"]) + len(deck.get("routes", []))
    assert samples[("agent_table_entries", (("table", "routes"),))] == routes > 0
    assert samples[("agent_table_entries", (("table", "services"),))] == len(deck["services"])
    assert samples[("agent_cpu_seconds_total", ())] > 0
    assert samples[("agent_resident_memory_bytes", ())] > 10 << 20


def test_readiness_waits_for_the_credential_table_while_liveness_does_not(gateway, start_agent,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    deck = tmp_path / "kong.yaml"
    deck.write_text("")  # not written yet
    metrics = free_loopback_port()
    agent = start_agent(gateway.port, "--metrics-listen", f"127.0.0.1:{metrics}", deck=deck)
    wait_for_scrape(metrics, lambda s: ("agent_table_loaded", (("table", "credentials"),)) in s)
    assert probe(metrics, "/healthz") == (200, {"status": "ok"})
    assert probe(metrics, "/readyz") == (503, {"status": "unavailable", "reasons": ["credentials table not loaded yet"]})
    deck.write_text(DECK.read_text())
    agent.wait_for("credentials: loaded")
    wait_ready(metrics)
    assert httpx.get(f"http://127.0.0.1:{metrics}/nowhere").status_code == 404
    for _ in range(5):  # scrapers that hang up mid-answer (a scrape timeout), with a reset
        hung_up = socket.create_connection(("127.0.0.1", metrics))
        hung_up.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        hung_up.send(b"GET /metrics HTTP/1.0\r\n\r\n")
        hung_up.close()
    assert probe(metrics, "/healthz") == (200, {"status": "ok"})
    code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert "Traceback" not in agent.stderr and "-----" not in agent.stderr, agent.stderr


def test_a_spool_filling_behind_a_failing_endpoint_makes_it_unready_and_shows_why(
        gateway, start_agent, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("METERING_API_TOKEN", INGEST_TOKEN)
    metrics = free_loopback_port()
    with IngestDouble(INGEST_TOKEN) as double:
        double.inject(Fault("status", status=503, times=None))
        agent = start_agent(gateway.port, "--metrics-listen", f"127.0.0.1:{metrics}", "--ingest-endpoint",
                            double.url, "--data-dir", str(tmp_path / "data"), "--spool-max-bytes", "8192",
                            "--flush-interval", "0.1", to_file=False)
        wait_ready(metrics)
        alice = KEYS["alice"][0]
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            for number in range(40):  # about 600 bytes an event: well past 8 KiB
                client.get(f"/orders/{number}", headers={"apikey": alice})
        refused = ("agent_delivery_batches_total", (("status_class", "5xx"),))
        # the spool may fill before the first refused batch is reported: wait for both
        samples = wait_for_scrape(metrics, lambda s: s[("agent_lost_total", (("reason", "dropped_full"),))] > 0
                                  and s.get(refused, 0) >= 1)
        status, body = probe(metrics, "/readyz")
        code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert status == 503 and len(body["reasons"]) == 1, body
    assert re.fullmatch(r"spool (9\d|100)% full \(\d+ of 8192 bytes\)", body["reasons"][0]), body
    assert samples[("agent_spool_limit_bytes", ())] == 8192
    assert samples[("agent_spool_bytes", ())] >= 0.9 * 8192
    assert samples[("agent_spool_oldest_event_age_seconds", ())] >= 0
    assert samples[refused] >= 1
    assert ("agent_delivery_batches_total", (("status_class", "2xx"),)) not in samples


def test_metrics_flag_errors_are_one_line(tmp_path: Path) -> None:
    bad = run_agent("--iface", "lo", "--metrics-listen", "9464", check=False)
    assert bad.returncode == 2 and "--metrics-listen: '9464' is not ADDR:PORT" in bad.stderr
    replay = run_agent("--read", str(tmp_path / "x.pcap"), "--metrics-listen", "127.0.0.1:9464", check=False)
    assert replay.returncode == 2 and "--metrics-listen goes with live capture" in replay.stderr
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_agent("--iface", "lo", "--credentials", str(DECK), "--output", str(tmp_path / "e.jsonl"),
                           "--metrics-listen", f"127.0.0.1:{port}", "--log-level", "warning", check=False)
    assert result.returncode == 1
    assert one_line_error(result) == (f"agent: error: --metrics-listen 127.0.0.1:{port}: cannot listen there"
                                      " (Address already in use)")
