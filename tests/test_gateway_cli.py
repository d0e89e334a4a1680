"""The agent as a user runs it with the gateway's configuration: a refused configuration stops the start
with one line and exit 2 (replay and live), and the plugin's own endpoint and token deliver the events
when the command line names no sink, the token never shown."""

import os

import yaml

from conftest import CAPTURES, one_line_error, read_events, run_agent
from tests.doubles.ingest import IngestDouble

TOKEN = "spat_cli-plugin-token-7d1e"
CAPTURE = str(CAPTURES / "nginx-basic.pcap")


def deck_with(tmp_path, *plugins: dict) -> str:
    """The fixture's consumers and keys, with these plugin entries."""
    document = yaml.safe_load((CAPTURES / "kong.yaml").read_text())
    document["plugins"] = [*document["plugins"], *plugins]
    path = tmp_path / "kong.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "METERING_API_TOKEN"}
    return {**env, **extra}


def test_a_refused_plugin_config_stops_a_replay_with_one_line_and_exit_2(tmp_path):
    deck = deck_with(tmp_path, {"name": "metering-and-billing", "config": {"api_token": TOKEN, "flush_every": 3}})
    result = run_agent("--read", CAPTURE, "--credentials", deck, "--output", str(tmp_path / "out.jsonl"),
                       check=False)
    line = one_line_error(result)
    assert result.returncode == 2
    assert line.endswith("kong.yaml: plugins[1]: config.flush_every is not a metering-and-billing setting")
    assert TOKEN not in result.stderr


def test_a_refused_plugin_config_stops_live_capture_before_it_starts(tmp_path):
    deck = deck_with(tmp_path, {"name": "metering-and-billing",
                                "config": {"subject": {"look_up_value_in": "application"}}})
    result = run_agent("--iface", "lo", "--credentials", deck, "--output", str(tmp_path / "out.jsonl"),
                       check=False, timeout=60)
    line = one_line_error(result)
    assert result.returncode == 2 and "application is not supported" in line


def test_a_missing_plugins_file_is_exit_2(tmp_path):
    result = run_agent("--read", CAPTURE, "--credentials", str(CAPTURES / "kong.yaml"), "--plugins",
                       str(tmp_path / "plugins.yaml"), "--output", "-", check=False)
    assert result.returncode == 2 and one_line_error(result).endswith("plugins.yaml: no such file")


def test_the_plugins_endpoint_and_vault_token_deliver_a_replay_and_the_token_is_never_shown(tmp_path):
    expected = tmp_path / "expected.jsonl"
    run_agent("--read", CAPTURE, "--credentials", str(CAPTURES / "kong.yaml"), "--output", str(expected))
    with IngestDouble(token=TOKEN) as ingest:
        deck = deck_with(tmp_path, {"name": "metering-and-billing", "config": {
            "ingest_endpoint": ingest.konnect_url, "api_token": "{vault://env/metering-token}"}})
        result = run_agent("--read", CAPTURE, "--credentials", deck, "--data-dir", str(tmp_path / "data"),
                           "--log-level", "debug", env=clean_env(METERING_TOKEN=TOKEN))
        accepted = ingest.accepted_counts()
    assert {event_id for _, event_id in accepted} == {event["id"] for event in read_events(expected)}
    assert f"events go to the ingest endpoint the metering-and-billing entries name: {ingest.konnect_url}" \
        in result.stderr
    assert TOKEN not in result.stderr


def test_the_environments_token_wins_over_the_plugins(tmp_path):
    with IngestDouble(token="the-environments-token") as ingest:
        deck = deck_with(tmp_path, {"name": "metering-and-billing", "config": {
            "ingest_endpoint": ingest.url, "api_token": TOKEN}})
        result = run_agent("--read", CAPTURE, "--credentials", deck, "--data-dir", str(tmp_path / "data"),
                           env=clean_env(METERING_API_TOKEN="the-environments-token"))
        assert sum(ingest.accepted_counts().values()) > 0
    assert TOKEN not in result.stderr and "the-environments-token" not in result.stderr


def test_flags_override_the_plugins_endpoint(tmp_path):
    deck = deck_with(tmp_path, {"name": "metering-and-billing", "config": {
        "ingest_endpoint": "http://127.0.0.1:9/v3/openmeter/events", "api_token": TOKEN}})
    output = tmp_path / "out.jsonl"
    result = run_agent("--read", CAPTURE, "--credentials", deck, "--output", str(output), env=clean_env())
    assert read_events(output) and "events go to the ingest endpoint" not in result.stderr


def test_an_unset_token_variable_is_one_line_naming_it(tmp_path):
    deck = deck_with(tmp_path, {"name": "metering-and-billing", "config": {
        "ingest_endpoint": "http://127.0.0.1:9/v3/openmeter/events", "api_token": '${{ env "DECK_AUTH_TOKEN" }}'}})
    result = run_agent("--read", CAPTURE, "--credentials", deck, "--data-dir", str(tmp_path / "data"),
                       "--log-level", "warning", env=clean_env(), check=False)
    assert result.returncode == 2
    assert one_line_error(result).endswith("api_token refers to $DECK_AUTH_TOKEN, which is not set")
