"""`--config FILE`, `AGENT_<FLAG>` and `--log-format json`, as a service manager or a container uses them: the
agent replays a capture with its flags coming from the file, the environment and the command line, and
its events and stderr show which one won."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config import _flags, env_name
from conftest import CAPTURES, one_line_error, read_events, run_agent, summary

KONG = str(CAPTURES / "kong.yaml")
BASIC = str(CAPTURES / "nginx-basic.pcap")


def environment(**variables: str) -> dict[str, str]:
    base = {name: value for name, value in os.environ.items() if not name.startswith("AGENT_")}
    return {**base, **variables}


def sources(path: Path) -> set[str]:
    return {event["source"] for event in read_events(path)}


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    config = tmp_path / "agent.yaml"
    config.write_text(f"read: {BASIC}\ncredentials: {KONG}\noutput: {output}\nsource: from-file\n"
                      "port: [8000, 8443]\n")
    run_agent("--config", str(config), env=environment())
    assert sources(output) == {"from-file"}
    run_agent("--config", str(config), env=environment(AGENT_SOURCE="from-env"))
    assert sources(output) == {"from-env"}
    run_agent("--config", str(config), "--source", "from-flag", env=environment(AGENT_SOURCE="from-env"))
    assert sources(output) == {"from-flag"}
    # the file named by the environment, as a container sets it
    run_agent(env=environment(AGENT_CONFIG=str(config)))
    assert sources(output) == {"from-file"}


def test_a_mode_given_higher_up_replaces_the_files_other_mode(tmp_path: Path) -> None:
    """The file says capture live; the command line says replay: it replays (no complaint that --read and
    --iface exclude each other)."""
    output = tmp_path / "events.jsonl"
    config = tmp_path / "agent.yaml"
    config.write_text(f"iface: lo\ncredentials: {KONG}\noutput: {output}\n")
    result = run_agent("--config", str(config), "--read", BASIC, env=environment())
    assert summary(result.stderr)["events"] == len(read_events(output)) > 0


def test_on_off_flags_and_lists_from_the_file_and_the_environment(tmp_path: Path) -> None:
    """`no-key-in-query: true` in the file: keys sent in the query are no longer found (unresolved); the
    environment turns it back off."""
    output = tmp_path / "events.jsonl"
    config = tmp_path / "agent.yaml"
    config.write_text(f"read: {BASIC}\ncredentials: {KONG}\noutput: {output}\nno-key-in-query: true\n"
                      "port: [8000]\n")
    with_flag = summary(run_agent("--config", str(config), env=environment()).stderr)
    without = summary(run_agent("--config", str(config), env=environment(AGENT_NO_KEY_IN_QUERY="false")).stderr)
    assert with_flag["unresolved"] > without["unresolved"]
    assert with_flag["events"] < without["events"]
    config.write_text(f"read: {BASIC}\ncredentials: {KONG}\noutput: {output}\nport: [9]\n")
    assert summary(run_agent("--config", str(config), env=environment()).stderr)["requests"] == 0
    # a repeatable flag's variable holds a list, every item taken: the gateway's port first or last
    alone = summary(run_agent("--read", BASIC, "--credentials", KONG, "--output", str(output), "--port", "8000",
                              env=environment()).stderr)["requests"]
    for ports in ("9, 8000", "8000,9"):
        listed = summary(run_agent("--config", str(config), env=environment(AGENT_PORT=ports)).stderr)
        assert listed["requests"] == alone > 0, ports


@pytest.mark.parametrize(("content", "variables", "expected"), [
    ("ifcae: lo\n", {}, "--config {config}: unknown key 'ifcae'; the keys are the flags' long names"),
    ("iface: lo\nworkers: many\n", {}, "--config {config}: workers: 'many' is not a whole number"),
    ("iface: lo\nport: [80, 99999]\n", {}, "--config {config}: port: must be between 1 and 65535"),
    ("iface: lo\nworkers: [1, 2]\n", {}, "--config {config}: workers: takes one value, not a list"),
    ("iface: {name: lo}\n", {}, "--config {config}: iface: takes one value, not a mapping"),
    ("iface: lo\nport: [80\n", {}, "--config {config}: not valid YAML at line 3"),
    # the last would win, and one of the two ports go unmetered
    ("iface: lo\nport: 8000\nport: 8443\n", {}, "--config {config}: a key is repeated at line 3 (first at line 2)"),
    ("- iface\n", {}, "--config {config}: must be a mapping of flag names to values"),
    ("iface: lo\nconfig: other.yaml\n", {}, "--config {config}: unknown key 'config'"),
    ("iface: lo\nspat_9f8e7d6c5b4a3928: x\n", {}, "--config {config}: unknown key '(a field not shown"),
    ("iface: lo\n", {"AGENT_RING_MB": "lots"}, "$AGENT_RING_MB: 'lots' is not a whole number"),
    ("iface: lo\n", {"AGENT_NO_YIELD_CPU": "maybe"}, "$AGENT_NO_YIELD_CPU: takes true or false"),
    # the token's own variable is METERING_API_TOKEN: the flag-shaped one is refused, not left unread
    ("iface: lo\n", {"AGENT_API_TOKEN": "tok-3f9a"},
     "$AGENT_API_TOKEN is not read: set $METERING_API_TOKEN or use --api-token-file PATH"),
    ("iface: lo\n", {"AGENT_ADMIN_TOKEN": "tok-77c1"},
     "$AGENT_ADMIN_TOKEN is not read: set $KONG_ADMIN_TOKEN or use --admin-token-file PATH"),
    # an empty list would quietly replace the file's ports with the default
    ("iface: lo\nport: [9000]\n", {"AGENT_PORT": " , "}, "$AGENT_PORT: no value given"),
])
def test_bad_keys_and_values_are_one_line_and_exit_2(tmp_path: Path, content: str, variables: dict,
                                                     expected: str) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(content)
    result = run_agent("--config", str(config), env=environment(**variables), check=False)
    assert result.returncode == 2
    assert one_line_error(result).startswith("agent: error: " + expected.format(config=config))
    assert all(value not in result.stderr for value in variables.values() if value.startswith("tok-"))


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run_agent("--config", str(tmp_path / "none.yaml"), check=False)
    assert result.returncode == 2
    assert one_line_error(result).startswith(f"agent: error: --config {tmp_path / 'none.yaml'}: cannot read it")


def test_every_flag_is_a_key_and_a_variable_and_the_help_says_the_precedence() -> None:
    parser = build_parser()
    keys = _flags(parser)
    shown = parser.format_help()
    for key in keys:
        assert f"--{key}" in shown
    assert {"iface", "read", "port", "ring-mb", "no-yield-cpu", "metrics-listen", "log-format"} <= set(keys)
    assert env_name("ring-mb") == "AGENT_RING_MB"
    assert "Precedence: a flag given > the environment > the file" in " ".join(shown.split())


def test_json_logs_are_one_object_a_line_with_the_summary_as_fields(tmp_path: Path) -> None:
    result = run_agent("--read", BASIC, "--credentials", KONG, "--output", str(tmp_path / "e.jsonl"),
                       "--log-format", "json", env=environment())
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert any(entry["level"] == "info" and entry["message"].startswith("credentials: loaded") for entry in entries)
    (closing,) = [entry for entry in entries if entry["message"] == "summary"]
    assert closing["fields"]["events"] == len(read_events(tmp_path / "e.jsonl")) > 0
    failed = run_agent("--read", str(tmp_path / "none.pcap"), "--output", "-", "--log-format", "json",
                       env=environment(), check=False)
    (line,) = failed.stderr.splitlines()
    assert failed.returncode == 1 and json.loads(line)["level"] == "error"
