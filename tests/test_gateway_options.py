"""How the gateway's configuration meets the command line: `--plugins FILE` (replacing the gateway's own
entries, reloaded when it changes), the checks that need both (a key never becomes an attribute), the
flags that override the file, and the plugin's endpoint and token references."""

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from agent.cli import build_parser
from agent.credentials.options import credentials_from_args
from agent.credentials.sync import CredentialSync
from agent.gateway import options as gateway_options
from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import Secret
from agent.gateway.secrets import PluginToken, resolve
from agent.sink.ingest import api_token_source
from agent.tokens import TokenError

TOKEN = "spat_plugin-token-4f2a9c"
GATEWAY = {
    "_format_version": "3.0",
    "services": [{"name": "example-service", "url": "http://httpbin.konghq.com",
                  "routes": [{"name": "example-route", "paths": ["/anything"]}]},
                 {"name": "orders", "url": "http://127.0.0.1:9000", "routes": [{"name": "orders-route",
                                                                                 "paths": ["/orders"]}]}],
    "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey", "x-api-key"]}},
                {"name": "metering-and-billing", "service": "orders", "config": {}}],
    "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]}],
}


def write(path, document) -> str:
    path.write_text(yaml.safe_dump(document))
    return str(path)


def args_for(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--read", "x.pcap", *argv])


def loaded(*argv: str) -> tuple[CredentialSync, dict | None]:
    args = args_for(*argv)
    sync = credentials_from_args(args)
    sync.load_once()
    return sync, gateway_options.gateway_from_args(args, sync)()


def test_the_plugins_file_replaces_the_gateways_entries_and_resolves_against_its_entities(tmp_path, caplog):
    deck = write(tmp_path / "kong.yaml", GATEWAY)
    plugins = write(tmp_path / "plugins.yaml", {"_format_version": "3.0", "services": [
        {"name": "example-service", "plugins": [{"name": "metering-and-billing", "config": {
            "attributes": [{"source": "query", "look_up_value_in": "dept", "event_property_name": "department"}]}}]}],
        "plugins": [{"name": "metering-and-billing", "route": "orders-route", "consumer": "alice",
                     "config": {"meter_api_requests": False}}]})
    with caplog.at_level(logging.INFO):
        sync, config = loaded("--credentials", deck, "--plugins", plugins)
    example = next(r for r in config["routes"] if r["name"] == "example-route")
    orders = next(r for r in config["routes"] if r["name"] == "orders-route")
    alice = sync.table.lookup("alice-key").id
    assert [(e["route"], e["service"], e["consumer"], e["meter_api_requests"]) for e in config["metering"]] == [
        (orders["id"], None, alice, False), (None, example["service"]["id"], None, True)]
    assert "1 metering-and-billing entries of decK file" in caplog.text and "replaces them" in caplog.text


@pytest.mark.parametrize("document, message", [
    ({"plugins": [{"name": "metering-and-billing", "service": "billing"}]},
     "plugins[0].service names no service of decK file"),
    ({"consumers": [{"username": "zed", "plugins": [{"name": "metering-and-billing"}]}]},
     "consumers[0].plugins[0] (nested in a consumer) names no consumer of decK file"),
    ({"plugins": [{"name": "key-auth"}]}, "plugins[0] is not a metering-and-billing entry (the file holds only those)"),
    ({"plugins": [{"name": "metering-and-billing", "config": {"subject": {"look_up_value_in": "application"}}}]},
     "plugins[0]: config.subject.look_up_value_in application is not supported"),
])
def test_what_the_plugins_file_cannot_mean_is_refused(tmp_path, document, message):
    deck = write(tmp_path / "kong.yaml", GATEWAY)
    plugins = write(tmp_path / "plugins.yaml", {"_format_version": "3.0", **document})
    with pytest.raises(GatewayConfigError) as raised:
        loaded("--credentials", deck, "--plugins", plugins)
    assert str(raised.value).startswith(f"--plugins {plugins}: {message}"), str(raised.value)


def test_a_missing_plugins_file_is_a_usage_error(tmp_path):
    deck = write(tmp_path / "kong.yaml", GATEWAY)
    with pytest.raises(GatewayConfigError, match=r"^--plugins .*nope.yaml: no such file$"):
        loaded("--credentials", deck, "--plugins", str(tmp_path / "nope.yaml"))


@contextlib.contextmanager
def watched_plugins_file(tmp_path) -> Iterator[tuple[Path, Callable[[], dict | None]]]:
    """A running sync over a decK file and a --plugins file with one entry (polled every 50 ms): the plugins
    file, and the pipeline's view of the gateway's configuration."""
    deck = write(tmp_path / "kong.yaml", GATEWAY)
    plugins = tmp_path / "plugins.yaml"
    write(plugins, {"_format_version": "3.0", "plugins": [{"name": "metering-and-billing", "service": "orders"}]})
    args = args_for("--credentials", deck, "--plugins", str(plugins), "--credentials-refresh", "3600")
    sync = credentials_from_args(args)
    sync._poll_seconds = 0.05
    gateway = gateway_options.gateway_from_args(args, sync)
    sync.start()
    try:
        assert sync.wait_ready(5)
        yield plugins, gateway
    finally:
        sync.stop()


def test_the_plugins_file_is_reloaded_when_it_changes(tmp_path):
    with watched_plugins_file(tmp_path) as (plugins, gateway):
        first = gateway()
        assert gateway() is first  # the same object until something changes
        assert len(first["metering"]) == 1
        write(plugins, {"_format_version": "3.0", "plugins": [{"name": "metering-and-billing", "service": "orders"},
                                                               {"name": "metering-and-billing"}]})
        deadline = time.monotonic() + 10
        while gateway() is first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(gateway()["metering"]) == 2


def test_a_refused_reload_keeps_the_last_good_configuration_and_says_so(tmp_path, caplog):
    with watched_plugins_file(tmp_path) as (plugins, gateway):
        first = gateway()
        with caplog.at_level(logging.WARNING):
            write(plugins, {"_format_version": "3.0", "plugins": [{"name": "metering-and-billing",
                                                                   "config": {"api_tokn": TOKEN}}]})
            deadline = time.monotonic() + 10
            while "config.api_tokn is not a metering-and-billing setting" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.05)
        assert gateway() is first and TOKEN not in caplog.text
        assert "keeping the last good table" in caplog.text


def test_a_reload_that_changes_nothing_hands_on_the_same_object(tmp_path):
    deck = write(tmp_path / "kong.yaml", GATEWAY)
    args = args_for("--credentials", deck)
    sync = credentials_from_args(args)
    gateway = gateway_options.gateway_from_args(args, sync)
    sync.load_once()
    first = gateway()
    os.utime(deck)
    sync.load_once()
    assert gateway() is first


@pytest.mark.parametrize("attribute, extra_flags", [
    ({"source": "header", "look_up_value_in": "X-API-KEY", "event_property_name": "k"}, ()),  # header: any case
    ({"source": "query", "look_up_value_in": "apikey", "event_property_name": "k"}, ()),
    ({"source": "header", "look_up_value_in": "token", "event_property_name": "k"}, ("--key-names", "token")),
])
def test_a_key_never_becomes_an_attribute(tmp_path, attribute, extra_flags):
    document = {**GATEWAY, "plugins": [*GATEWAY["plugins"], {"name": "metering-and-billing",
                                                              "config": {"attributes": [attribute]}}]}
    with pytest.raises(GatewayConfigError, match=r"plugins\[2\]: config.attributes\[0\] names one of key-auth's key "
                                                 r"names: a key never becomes an attribute$"):
        loaded("--credentials", write(tmp_path / "kong.yaml", document), *extra_flags)


def test_attributes_that_are_no_key_pass_and_the_check_errs_on_the_side_of_no_key(tmp_path):
    """As for `--subject`: a query name that differs from a key name only in case, or a header spelled with
    `_` for `-`, is refused too (key-auth itself reads `api_key` from the header `api-key`)."""
    attributes = [{"source": "query", "look_up_value_in": "dept", "event_property_name": "department"}]
    document = {**GATEWAY, "plugins": [*GATEWAY["plugins"], {"name": "metering-and-billing",
                                                              "config": {"attributes": attributes}}]}
    _, config = loaded("--credentials", write(tmp_path / "kong.yaml", document))
    assert config["metering"][1]["attributes"] == [{"source": "query", "name": "dept", "property": "department"}]
    for source, name in (("query", "APIKEY"), ("header", "x_api_key")):
        attributes[0] = {"source": source, "look_up_value_in": name, "event_property_name": "k"}
        with pytest.raises(GatewayConfigError, match="a key never becomes an attribute"):
            loaded("--credentials", write(tmp_path / "kong.yaml", document))


def test_an_entrys_subject_naming_a_key_is_refused_unless_the_flag_replaces_it(tmp_path):
    entry = {"name": "metering-and-billing", "config": {"subject": {"look_up_value_in": "header", "field": "apikey"}}}
    deck = write(tmp_path / "kong.yaml", {**GATEWAY, "plugins": [GATEWAY["plugins"][0], entry]})
    with pytest.raises(GatewayConfigError, match="config.subject.field names one of key-auth's key names"):
        loaded("--credentials", deck)
    _, config = loaded("--credentials", deck, "--subject", "header:X-Tenant")
    assert config["metering"][0]["subject"] == {"look_up_value_in": "header", "field": "x-tenant"}


def test_subject_flag_replaces_every_entrys_subject_and_absent_keeps_them(tmp_path):
    entries = [{"name": "metering-and-billing", "service": "orders",
                "config": {"subject": {"look_up_value_in": "query", "field": "tenant"}}},
               {"name": "metering-and-billing", "config": {}}]
    deck = write(tmp_path / "kong.yaml", {**GATEWAY, "plugins": [GATEWAY["plugins"][0], *entries]})
    _, own = loaded("--credentials", deck)
    assert [e["subject"] for e in own["metering"]] == [{"look_up_value_in": "query", "field": "tenant"},
                                                      {"look_up_value_in": "consumer", "field": None}]
    _, flagged = loaded("--credentials", deck, "--subject", "consumer")
    assert [e["subject"] for e in flagged["metering"]] == [{"look_up_value_in": "consumer", "field": None}] * 2


def test_plugins_needs_credentials(capsys):
    with pytest.raises(SystemExit):
        gateway_options.check_arguments(build_parser(), args_for("--plugins", "p.yaml"))
    assert "--plugins: needs --credentials" in capsys.readouterr().err


# -- the plugin's endpoint and token ----------------------------------------------------------------------

@pytest.mark.parametrize("reference, environ", [
    ("{vault://env/metering-token}", {"METERING_TOKEN": TOKEN}),         # Kong: - becomes _, upper-cased
    ("{vault://env/METERING_TOKEN}", {"METERING_TOKEN": TOKEN}),
    ("{vault://env/token?prefix=kong_}", {"KONG_TOKEN": TOKEN}),
    ("{vault://env/secrets/ingest}", {"SECRETS": '{"ingest": "%s"}' % TOKEN}),
    ('${{ env "DECK_AUTH_TOKEN" }}', {"DECK_AUTH_TOKEN": TOKEN}),
    (TOKEN, {}),
])
def test_api_token_references_resolve_from_the_environment(reference, environ):
    assert resolve(reference, "api_token", environ) == TOKEN
    assert PluginToken(Secret(reference), environ).read() == TOKEN


@pytest.mark.parametrize("reference, message", [
    ("{vault://env/metering-token}", "api_token refers to $METERING_TOKEN, which is not set"),
    ('${{ env "DECK_AUTH_TOKEN" }}', "api_token refers to $DECK_AUTH_TOKEN, which is not set"),
    ("{vault://aws/prod/token}", "api_token refers to the vault aws, which the agent cannot read"),
    ("{vault://env/secrets/missing}", "api_token refers to the key missing of a JSON object in $SECRETS,"),
    # the variable as the env vault reads it: dashes made underscores, the prefix first
    ("{vault://env/kong-secrets/missing?prefix=prod_}",
     "api_token refers to the key missing of a JSON object in $PROD_KONG_SECRETS,"),
])
def test_an_unresolvable_reference_names_the_variable_never_a_value(reference, message):
    with pytest.raises(TokenError) as raised:
        resolve(reference, "api_token", {"SECRETS": '{"ingest": "%s"}' % TOKEN,
                                         "PROD_KONG_SECRETS": '{"ingest": "%s"}' % TOKEN})
    assert str(raised.value).startswith(message) and TOKEN not in str(raised.value)


def test_the_environment_and_the_token_file_win_over_the_plugins_token(tmp_path):
    plugin = PluginToken(Secret("{vault://env/metering-token}"), {"METERING_TOKEN": TOKEN})
    assert api_token_source(None, plugin).read() == TOKEN
    os.environ["METERING_API_TOKEN"] = "from-the-environment"
    try:
        assert api_token_source(None, plugin).read() == "from-the-environment"
    finally:
        del os.environ["METERING_API_TOKEN"]
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    assert api_token_source(token_file, plugin).read() == "from-the-file"


def with_entries(tmp_path, *configs: dict) -> str:
    plugins = [GATEWAY["plugins"][0], *({"name": "metering-and-billing", "config": c} for c in configs)]
    return write(tmp_path / "kong.yaml", {**GATEWAY, "plugins": plugins})


def test_the_entries_endpoint_and_token_are_adopted_when_no_flag_names_a_sink(tmp_path):
    deck = with_entries(tmp_path, {"ingest_endpoint": "https://ingest.example/v3/openmeter/events",
                                   "api_token": "{vault://env/metering-token}"})
    args = args_for("--credentials", deck)
    sync, _ = loaded("--credentials", deck)
    gateway_options.adopt_plugin_delivery(args, sync, {"METERING_TOKEN": TOKEN})
    assert args.ingest_endpoint == "https://ingest.example/v3/openmeter/events"
    assert args.plugin_api_token.read() == TOKEN

    flagged = args_for("--credentials", deck, "--ingest-endpoint", "https://elsewhere.example/api/v1/events")
    gateway_options.adopt_plugin_delivery(flagged, sync, {"METERING_TOKEN": TOKEN})
    assert flagged.ingest_endpoint == "https://elsewhere.example/api/v1/events"
    assert flagged.plugin_api_token is None  # the plugin's token is never sent to another endpoint

    output = args_for("--credentials", deck, "--output", "-")
    gateway_options.adopt_plugin_delivery(output, sync, {})
    assert output.ingest_endpoint is None


def test_entries_naming_two_endpoints_are_refused_with_one_line(tmp_path):
    deck = with_entries(tmp_path, {"ingest_endpoint": "https://a.example/v3/openmeter/events"},
                        {"ingest_endpoint": "https://b.example/v3/openmeter/events"})
    sync, _ = loaded("--credentials", deck)
    with pytest.raises(GatewayConfigError, match=r"name 2 different ingest endpoints \(.*kong.yaml: plugins\[1\] "
                                                 r"and .*kong.yaml: plugins\[2\]\); the agent sends to one: "
                                                 r"give --ingest-endpoint$"):
        gateway_options.adopt_plugin_delivery(args_for("--credentials", deck), sync, {})
    flagged = args_for("--credentials", deck, "--ingest-endpoint", "https://a.example/v3/openmeter/events")
    with pytest.raises(GatewayConfigError):
        gateway_options.adopt_plugin_delivery(flagged, sync, {})


def test_live_start_tries_once_refusing_a_bad_configuration_and_riding_out_an_outage(tmp_path, caplog):
    bad = with_entries(tmp_path, {"subject": {"look_up_value_in": "application"}})
    with pytest.raises(GatewayConfigError):
        credentials_from_args(args_for("--credentials", bad)).load_at_start()
    args = args_for("--credentials", "http://127.0.0.1:9")  # nothing listens: an outage, not a refusal
    sync = credentials_from_args(args)
    with caplog.at_level(logging.WARNING):
        sync.load_at_start()
        gateway_options.adopt_plugin_delivery(args, sync)
    assert not sync.ready and args.ingest_endpoint is None
    assert "retrying with backoff" in caplog.text
    assert "could not be read at start: events go to the local store" in caplog.text
