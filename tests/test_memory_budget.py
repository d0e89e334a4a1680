"""`--max-memory`: one budget for the capture state. A flood of half-open requests past it costs the
oldest of them (closed early, counted `shed_connections`), never the legitimate traffic beside it."""

from __future__ import annotations

from bench_memory import PORT, craft
from conftest import CAPTURES, one_line_error, read_events, run_agent, summary

KONG = str(CAPTURES / "kong.yaml")


def flood(tmp_path) -> tuple[str, list[tuple[str, str, int]]]:
    """2,000 half-open requests holding 10 kB of head each (20 MB in all), 50 legitimate exchanges."""
    capture = tmp_path / "flood.pcap"
    expected = craft(capture, half_opens=2000, legitimate_count=50, header_bytes=1 << 20, padding=10_000)
    return str(capture), sorted((e["subject"], e["uri"], e["status"]) for e in expected)


def metered(output) -> list[tuple[str, str, int]]:
    return sorted((e["subject"], e["data"]["request_uri"], e["data"]["response_http_status"])
                  for e in read_events(output))


def test_a_flood_past_the_budget_sheds_the_oldest_and_meters_the_rest(tmp_path):
    capture, expected = flood(tmp_path)
    output = tmp_path / "events.jsonl"
    result = run_agent("--read", capture, "--port", str(PORT), "--credentials", KONG, "--output", str(output),
                       "--max-memory", "16M")
    counts = summary(result.stderr)
    assert metered(output) == expected
    assert counts["shed_connections"] > 0
    assert counts["internal_errors"] == 0


def test_within_the_default_budget_nothing_is_shed(tmp_path):
    capture, expected = flood(tmp_path)
    output = tmp_path / "events.jsonl"
    counts = summary(run_agent("--read", capture, "--port", str(PORT), "--credentials", KONG, "--output",
                               str(output)).stderr)
    assert metered(output) == expected
    assert counts["shed_connections"] == 0
    assert counts["lost_exchanges"] >= 2000  # the half-open heads, closed out unfinished at the end


def test_a_budget_too_small_or_malformed_is_refused_in_one_line(tmp_path):
    for value in ("1M", "lots", "2T"):
        result = run_agent("--read", str(tmp_path / "none.pcap"), "--credentials", KONG, "--max-memory", value,
                           check=False)
        assert result.returncode == 2 and "--max-memory" in one_line_error(result)


def test_the_workers_share_the_budget_and_each_needs_a_share_that_works(tmp_path):
    result = run_agent("--read", str(tmp_path / "none.pcap"), "--credentials", KONG, "--max-memory", "32M",
                       "--workers", "4", check=False)
    assert result.returncode == 2 and "4 workers need at least 64M" in one_line_error(result)
