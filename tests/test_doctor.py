"""`agent doctor`: one line per check of what a start needs, exit 0 only if all pass, against a real nginx, the
ingest double and real directories. Needs root (the capture permission is one of the checks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kong_standin import KongStandin, free_loopback_port

from conftest import CAPTURES, REPO
from tests.doubles.ingest import IngestDouble
from tests.test_live_e2e import INGEST_TOKEN, LiveAgent

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packet sockets")]

DECK = str(CAPTURES / "kong.yaml")


# root without the capabilities that let it capture and write anywhere (util-linux's setpriv)
UNPRIVILEGED = ["setpriv", "--bounding-set", "-net_raw,-dac_override,-dac_read_search"]


def doctor(*args: str, token: str | None = INGEST_TOKEN, unprivileged: bool = False,
           extra_env: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """The exit status, and each check's line by its name (`ok`, `warn` or `FAIL` and what it found)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AGENT_", "METERING_"))}
    if token is not None:
        env["METERING_API_TOKEN"] = token
    env.update(extra_env or {})
    command = [*(UNPRIVILEGED if unprivileged else []), sys.executable, "-m", "agent", "doctor", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.stderr == "", result.stderr
    assert token is None or token not in result.stdout
    lines = {}
    for line in result.stdout.splitlines():
        verdict, rest = line.split(None, 1)
        name, found = rest.split(": ", 1)
        assert verdict in ("ok", "warn", "FAIL")
        lines[name] = f"{verdict} {found}"
    return result.returncode, lines


@pytest.fixture
def gateway():
    with KongStandin(port=free_loopback_port()) as standin:
        yield standin


def test_a_start_that_would_work_passes_every_check(gateway, tmp_path: Path) -> None:
    metrics = free_loopback_port()
    with IngestDouble(INGEST_TOKEN) as double:
        code, lines = doctor("--iface", "lo", "--port", str(gateway.port), "--credentials", DECK,
                             "--ingest-endpoint", double.url, "--data-dir", str(tmp_path / "data"),
                             "--metrics-listen", f"127.0.0.1:{metrics}")
        assert double.accepted_counts() == {}  # nothing was ingested
    assert code == 0, lines
    assert lines["capture permission"] == "ok packet sockets can be opened"
    assert lines["interface lo"] == "ok up, loopback"
    assert lines[f"port {gateway.port}"].startswith("ok nginx: master process")
    assert lines["credentials"] == f"ok 4 consumers with 6 keys from decK file {DECK}"
    assert lines["ingest endpoint"] == f"ok {double.url} reachable, token accepted"
    assert lines[f"state directory {tmp_path / 'data'}"] == f"ok it will be created in {tmp_path}"
    assert lines["metrics address"] == f"ok 127.0.0.1:{metrics} is free"


def test_each_problem_is_its_own_failing_line(gateway, tmp_path: Path) -> None:
    nothing_there = free_loopback_port()
    with IngestDouble(INGEST_TOKEN) as double:
        code, lines = doctor("--iface", "lo", "--port", str(nothing_there), "--credentials", str(tmp_path / "no.yaml"),
                             "--ingest-endpoint", double.url, "--data-dir", str(tmp_path), token="spat_wrong_token")
    assert code == 1
    assert lines["interface lo"].startswith("ok")
    assert lines[f"port {nothing_there}"] == "FAIL nothing listens on it (is the gateway up, is --port its proxy port?)"
    assert lines["credentials"].startswith(f"FAIL --credentials {tmp_path / 'no.yaml'}: no such file")
    assert lines["ingest endpoint"] == (f"FAIL {double.url} refuses the token (401; from $METERING_API_TOKEN)")
    unreachable = f"http://127.0.0.1:{free_loopback_port()}/api/v1/events"
    code, lines = doctor("--iface", "no-such-if0", "--credentials", DECK, "--ingest-endpoint", unreachable)
    assert code == 1
    assert lines["interface no-such-if0"].startswith("FAIL no interface 'no-such-if0'; this host has: ")
    assert lines["ingest endpoint"].startswith(f"FAIL {unreachable} unreachable (ConnectError")


def test_a_spool_held_by_a_running_agent_and_an_unwritable_directory_fail(gateway, tmp_path: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("METERING_API_TOKEN", INGEST_TOKEN)
    data = tmp_path / "data"
    with IngestDouble(INGEST_TOKEN) as double:
        agent = LiveAgent(None, gateway.port, "--ingest-endpoint", double.url, "--data-dir", str(data))
        try:
            agent.wait_for("capturing on lo")
            code, lines = doctor("--iface", "lo", "--port", str(gateway.port), "--credentials", DECK,
                                 "--ingest-endpoint", double.url, "--data-dir", str(data))
        finally:
            agent.stop(signal.SIGTERM)
    assert code == 1
    assert lines[f"state directory {data / 'spool'}"] == "FAIL a running agent holds this spool"
    assert lines[f"state directory {data}"] == "ok writable"

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, lines = doctor("--read", str(CAPTURES / "nginx-basic.pcap"), "--credentials", DECK,
                         "--output", str(locked / "events.jsonl"), unprivileged=True)
    assert code == 1
    assert lines["capture file"] == "ok readable"
    assert lines[f"output {locked / 'events.jsonl'}"] == f"FAIL {locked} is not writable by uid 0"


def test_without_privileges_the_capture_permission_fails(tmp_path: Path) -> None:
    code, lines = doctor("--iface", "lo", "--subject", "header:host", "--data-dir", str(tmp_path / "d"),
                         token=None, unprivileged=True)
    assert code == 1
    assert lines["capture permission"].startswith("FAIL no permission to capture on lo: run as root or grant"
                                                  " CAP_NET_RAW")
    assert lines["credentials"] == "ok none needed for --subject header:host"
    assert lines[f"state directory {tmp_path / 'd'}"] == f"ok it will be created in {tmp_path}"


def test_the_endpoint_and_token_the_plugin_names_are_the_ones_checked(gateway, tmp_path: Path) -> None:
    """No --ingest-endpoint: the start would send where the metering-and-billing entries say, with their
    api_token, so that is what is checked (a wrong token fails, and is never printed)."""
    with IngestDouble(INGEST_TOKEN) as double:
        state = yaml.safe_load(Path(DECK).read_text())
        state["plugins"].append({"name": "metering-and-billing", "config": {
            "ingest_endpoint": double.url, "api_token": "{vault://env/metering-token}"}})
        deck = tmp_path / "kong.yaml"
        deck.write_text(yaml.safe_dump(state))
        common = ("--iface", "lo", "--port", str(gateway.port), "--credentials", str(deck),
                  "--data-dir", str(tmp_path / "data"))
        code, lines = doctor(*common, token=None, extra_env={"METERING_TOKEN": "spat_not_the_one"})
        assert code == 1 and lines["ingest endpoint"].startswith(f"FAIL {double.url} refuses the token (401")
        assert not any("spat_not_the_one" in line for line in lines.values())
        code, lines = doctor(*common, token=None, extra_env={"METERING_TOKEN": INGEST_TOKEN})
        assert code == 0, lines
        assert lines["ingest endpoint"] == f"ok {double.url} reachable, token accepted"
