"""A capture of Kong's metering tutorial (captures/nginx-routes.pcap, recorded behind nginx locations made
from captures/kong-tutorial.yaml) replayed as a user would: each event carries the route and service of
the location that answered, with the decK file's ids, the attributes the plugin takes, and only what the
plugin bills (its service, its status filter); the same from `--plugins FILE` on a gateway without the
plugin (Kong OSS), and from the Admin API."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from conftest import CAPTURES, read_events, run_agent, summary
from tests.doubles.kong_admin import KongAdminDouble

TRUTH = json.loads((CAPTURES / "nginx-routes.truth.json").read_text())
TUTORIAL = yaml.safe_load((CAPTURES / "kong-tutorial.yaml").read_text())
KONG_FIELDS = {"request_method", "request_uri", "request_host", "client_ip", "request_user_agent",
               "request_size_bytes", "response_http_status", "response_size_bytes", "upstream_status", "route_id",
               "route_name", "service_id", "service_name", "service_port", "service_protocol", "subject_type",
               "latency_ms"}


def expected() -> Counter:
    return Counter((e["subject"], e["method"], e["uri"], e["status"], e["route_id"], e["route_name"],
                    e["service_id"], e["service_name"], e["service_port"], e["service_protocol"],
                    tuple(sorted(e["attributes"].items()))) for e in TRUTH["events"])


def seen(events: list[dict]) -> Counter:
    rows = Counter()
    for event in events:
        data = event["data"]
        rows[(event["subject"], data["request_method"], data["request_uri"], data["response_http_status"],
              data["route_id"], data["route_name"], data["service_id"], data["service_name"], data["service_port"],
              data["service_protocol"], tuple(sorted((k, v) for k, v in data.items() if k not in KONG_FIELDS)))] += 1
    return rows


def replay(tmp_path, *credentials: str) -> tuple[list[dict], dict[str, int]]:
    output = tmp_path / "events.jsonl"
    result = run_agent("--read", str(CAPTURES / TRUTH["capture"]), "--port", str(TRUTH["ports"][0]),
                       *credentials, "--output", str(output))
    return read_events(output), summary(result.stderr)


def test_the_tutorials_events_carry_the_answering_route_and_its_service_from_the_deck_file(tmp_path):
    events, counters = replay(tmp_path, "--credentials", str(CAPTURES / "kong-tutorial.yaml"))
    assert seen(events) == expected()
    example = next(e for e in events if e["data"]["route_name"] == "example-route")
    assert (example["data"]["route_id"], example["data"]["service_id"]) == (
        "2a7c1b4f-6d3e-4f90-8b82-4c5d6e7f8a02", "1f6b0a3e-5c2d-4e8f-9a71-3b4c5d6e7f01")
    assert not any(e["data"]["service_name"] == "orders" for e in events)  # no plugin on orders
    assert {e["data"]["response_http_status"] for e in events} == {200, 201, 404}  # 500 and 429 filtered out
    for name, value in TRUTH["counters"].items():
        assert counters[name] == value, name


def without_the_plugin(document: dict) -> dict:
    """The decK file as Kong OSS holds it: every metering-and-billing entry taken out."""
    document = json.loads(json.dumps(document))
    for service in document["services"]:
        service.pop("plugins", None)
        for route in service.get("routes", []):
            route.pop("plugins", None)
    return document


def test_the_same_from_a_plugins_file_on_a_gateway_without_the_plugin(tmp_path):
    gateway = tmp_path / "kong.yaml"
    gateway.write_text(yaml.safe_dump(without_the_plugin(TUTORIAL)))
    example, billing = TUTORIAL["services"][0], TUTORIAL["services"][2]
    plugins = tmp_path / "plugins.yaml"
    plugins.write_text(yaml.safe_dump({
        "_format_version": "3.0",
        "services": [{"name": "example-service", "plugins": example["plugins"]}],
        "routes": [{"name": "billing-route", "plugins": billing["routes"][0]["plugins"]}]}))
    events, _ = replay(tmp_path, "--credentials", str(gateway), "--plugins", str(plugins))
    assert seen(events) == expected()


def test_without_any_plugin_entry_everything_is_metered_with_its_route(tmp_path):
    gateway = tmp_path / "kong.yaml"
    gateway.write_text(yaml.safe_dump(without_the_plugin(TUTORIAL)))
    events, counters = replay(tmp_path, "--credentials", str(gateway))
    names = Counter(e["data"]["route_name"] for e in events)
    assert names["orders-route"] == TRUTH["counters"]["out_of_scope"]  # metered now, with their route
    assert counters["no_route"] == TRUTH["counters"]["no_route"]
    assert {e["subject"] for e in events if e["data"]["route_name"] == "billing-route"} == {"bob", "alice"}


@pytest.fixture
def kong():
    """The tutorial's setup as Kong's Admin API lists it (Kong's ids, `{"id": ...}` references)."""
    with KongAdminDouble() as double:
        for made, service in enumerate(TUTORIAL["services"]):
            scheme, _, rest = service["url"].partition("://")
            host, _, port = rest.partition(":")
            double.add_service(service["name"], host=host, protocol=scheme, id=service["id"],
                               port=int(port) if port else (443 if scheme == "https" else 80))
            for order, route in enumerate(service["routes"]):
                fields = {key: route[key] for key in ("paths", "hosts") if key in route}
                double.add_route(service["name"], name=route["name"], id=route["id"],
                                 created_at=1_700_000_000 + 10 * made + order, **fields)
                for plugin in route.get("plugins", []):
                    double.add_plugin(plugin["name"], plugin["config"], route=route["name"])
            for plugin in service.get("plugins", []):
                double.add_plugin(plugin["name"], plugin["config"], service=service["name"])
        for plugin in TUTORIAL["plugins"]:
            double.add_plugin(plugin["name"], plugin["config"])
        for consumer in TUTORIAL["consumers"]:
            double.add_consumer(consumer["username"], custom_id=consumer["custom_id"], id=consumer["id"])
            for credential in consumer["keyauth_credentials"]:
                double.add_key(consumer["username"], credential["key"])
        yield double


def test_the_same_from_the_admin_api(tmp_path, kong):
    events, _ = replay(tmp_path, "--credentials", kong.url)
    assert seen(events) == expected()
