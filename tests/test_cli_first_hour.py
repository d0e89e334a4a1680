"""What a new user meets in the first hour (issue 13): a stop that says what it kept, a replay that gives
up on a dead endpoint, a damaged capture told apart from a good one, one-line errors for a mistyped path,
valid event ids, and a usage line that names every command."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import CAPTURES, REPO, one_line_error, read_events, run_agent, summary

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


# damaged captures


DAMAGED = 3


def test_a_capture_cut_short_writes_what_it_read_then_exits_3(tmp_path):
    """`head -c 1000 x.pcap`: the events before the cut are written, and the exit status says damage."""
    cut, output = tmp_path / "cut.pcap", tmp_path / "events.jsonl"
    data = (CAPTURES / "nginx-basic.pcap").read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 7])
    result = run_agent("--read", str(cut), "--credentials", KONG, "--output", str(output), check=False)
    assert result.returncode == DAMAGED, result.stderr
    assert "Traceback" not in result.stderr
    counters = summary(result.stderr)
    assert 0 < counters["events"] == len(read_events(output))
    assert result.stderr.splitlines()[-1] == (f"agent: error: {cut} is damaged: 1 record could not be read;"
                                              " every event that could be was written")


def test_a_truncated_gzip_capture_exits_3_with_one_worker_or_two(tmp_path):
    cut = tmp_path / "cut.pcap.gz"
    whole = (CAPTURES / "nginx-basic-gz.pcap.gz").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    for workers in ("1", "2"):
        result = run_agent("--read", str(cut), "--credentials", KONG, "--output", "/dev/null", "--workers",
                           workers, check=False)
        assert result.returncode == DAMAGED, result.stderr
        assert summary(result.stderr)["events"] > 0
        assert result.stderr.splitlines()[-1].startswith(f"agent: error: {cut} is damaged: 1 record ")


def test_a_clean_capture_exits_0_and_says_nothing_of_damage():
    result = run_agent("--read", BASIC, "--credentials", KONG, "--output", "/dev/null")
    assert result.returncode == 0 and "damaged" not in result.stderr


# stopping a replay, and a replay whose ingest endpoint is down


INTERLEAVED = str(CAPTURES / "crafted-interleaved.pcap")
SPOOL_LINE = re.compile(r"agent: error: (\d+) events are still in the spool, not yet acknowledged; the next start"
                        r" sends them")


def unreachable_endpoint() -> str:
    """A loopback port nothing listens on: every connection is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/api/v1/events"


class Replay:
    """The agent replaying to an endpoint that is down, its stderr read on a thread as it comes."""

    def __init__(self, tmp_path, *flags: str, capture: str = INTERLEAVED) -> None:
        command = [sys.executable, "-m", "agent", "--read", capture, "--credentials", KONG,
                   "--ingest-endpoint", unreachable_endpoint(), "--data-dir", str(tmp_path / "data"), *flags]
        self.process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, fragment: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(fragment in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, "\n".join(self.lines)
            time.sleep(0.05)

    def end(self, signum: int | None = None, timeout: float = 60) -> tuple[int, list[str]]:
        if signum is not None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code, self.lines


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_replay_stopped_while_waiting_for_the_endpoint_says_what_it_kept(tmp_path, signum, status):
    replay = Replay(tmp_path, "--give-up-after", "0", capture=BASIC)  # read at once: the wait is for the endpoint
    replay.wait_for("ingest endpoint unavailable")
    time.sleep(0.5)  # into the wait for acknowledgements
    code, lines = replay.end(signum)
    assert code == status, lines
    assert not any("Traceback" in line for line in lines)
    counters = summary("\n".join(lines))
    spooled = [SPOOL_LINE.fullmatch(line) for line in lines if SPOOL_LINE.fullmatch(line)]
    assert len(spooled) == 1 and int(spooled[0][1]) == counters["pending"] == counters["events"] > 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_replay_stopped_while_the_spool_is_full_says_what_it_kept(tmp_path, workers):
    replay = Replay(tmp_path, "--give-up-after", "0", "--spool-max-bytes", "8192", "--workers", workers)
    replay.wait_for("is full")
    code, lines = replay.end(signal.SIGTERM)
    assert code == 143, lines
    counters = summary("\n".join(lines))
    spooled = [SPOOL_LINE.fullmatch(line) for line in lines if SPOOL_LINE.fullmatch(line)]
    assert len(spooled) == 1 and int(spooled[0][1]) == counters["pending"] > 0
    assert counters["packets"] > 0 and counters["events"] < 3702  # stopped before the end


def test_a_replay_gives_up_on_an_endpoint_that_makes_no_progress(tmp_path):
    started = time.monotonic()
    code, lines = Replay(tmp_path, "--give-up-after", "2").end()
    stderr = "\n".join(lines)
    assert code == 1, stderr
    assert time.monotonic() - started < 30
    assert any("gave up: no event acknowledged for 2 s" in line for line in lines), stderr
    assert SPOOL_LINE.fullmatch(lines[-1]) and int(SPOOL_LINE.fullmatch(lines[-1])[1]) == summary(stderr)["pending"]


def test_a_replay_blocked_on_a_full_spool_gives_up_too(tmp_path):
    code, lines = Replay(tmp_path, "--give-up-after", "2", "--spool-max-bytes", "8192").end()
    stderr = "\n".join(lines)
    assert code == 1, stderr
    counters = summary(stderr)
    assert counters["events"] < 3702 and counters["pending"] > 0
    assert SPOOL_LINE.fullmatch(stderr.splitlines()[-1])


def test_help_states_the_give_up_default_and_the_exit_statuses():
    text = " ".join(run_agent("--help").stdout.split())
    assert "--give-up-after SECONDS" in text and "(default 60; 0: wait as long as it takes)" in text
    for status in ("130", "143", "3"):
        assert status in text.split("exit status", 1)[1]


# the quick start follows Kong's tutorial


def test_the_example_deck_file_has_the_tutorials_consumer_key_service_and_route():
    import yaml

    from agent.credentials.deck import load_deck_file

    table = load_deck_file(CAPTURES / "kong.yaml").table
    assert table.lookup("alice-key").subject("username") == "alice"
    assert table.lookup("alice-key-7f3a9c") == table.lookup("alice-key")  # the fixtures' key stays
    services = {service["name"]: service for service in yaml.safe_load((CAPTURES / "kong.yaml").read_text())["services"]}
    routes = {route["name"]: route for route in services["example-service"]["routes"]}
    assert routes["example-route"]["paths"] == ["/anything"]


def test_the_readme_quick_start_shows_the_curl_and_what_agent_events_prints():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "curl -H 'apikey: alice-key' localhost:8000/anything" in quick_start
    assert "agent events" in quick_start and "alice" in quick_start.split("agent events", 2)[2]
