"""Routes, services and plugin entries from decK state files, as the dict the core's set_gateway takes."""

from pathlib import Path

import pytest
import yaml

from agent.credentials.deck import load_deck_file, parse_deck
from agent.credentials.errors import CredentialError
from agent.deck_file import derived_id
from agent.gateway.core_config import Overrides, core_gateway
from agent.gateway.errors import GatewayConfigError
from agent.gateway.plugins_file import PluginsFile
from agent.gateway.source import GatewaySource

FIXTURE = Path(__file__).resolve().parents[1] / "captures" / "kong.yaml"
TUTORIAL = {
    "_format_version": "3.0",
    "services": [
        {"name": "example-service", "url": "http://httpbin.konghq.com", "id": "5b5a5dc0-1111-4b8e-9d44-0a0b0c0d0e01",
         "routes": [{"name": "example-route", "paths": ["/anything"], "id": "6c6b6ed1-2222-4c9f-8e55-1b1c1d1e1f02"}],
         "plugins": [{"name": "metering-and-billing", "config": {
             "ingest_endpoint": "https://us.api.konghq.com/v3/openmeter/events",
             "api_token": "{vault://env/metering-token}",
             "subject": {"look_up_value_in": "consumer"},
             "attributes": [{"source": "header", "look_up_value_in": "X-Department", "event_property_name": "dept"}],
             "allow_status_codes": ["200-299", "404"]}}]},
        {"name": "internal", "url": "https://internal.example",
         "routes": [{"name": "internal-route", "paths": ["/internal"]}]},
    ],
    "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}],
    "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]}],
}


def gateway_dict(document: dict, overrides: Overrides = Overrides(), plugins: Path | None = None) -> dict | None:
    source = GatewaySource(_Text(yaml.safe_dump(document)), PluginsFile(plugins) if plugins else None, overrides)
    return core_gateway(source.load().gateway, overrides)


class _Text:
    """A decK file given as text, as a credential source."""

    description = "kong.yaml"

    def __init__(self, text: str) -> None:
        self.text = text

    def load(self):
        return parse_deck(self.text, "kong.yaml")

    def fingerprint(self):
        return None


def test_the_seed_file_gives_its_routes_with_their_services_and_meters_everything():
    snapshot = GatewaySource(_File(FIXTURE), None, Overrides()).load()
    config = core_gateway(snapshot.gateway, Overrides())
    routes = {route["name"]: route for route in config["routes"]}
    assert list(routes) == ["example-route", "orders-route"]  # file order
    example = routes["example-route"]
    assert example["id"] == derived_id("route", "example-route")  # no id in the file: derived from the name
    assert example["service"] == {"id": derived_id("service", "example-service"), "name": "example-service",
                                  "port": 80, "protocol": "http"}
    assert example["paths"] == ["/anything"] and example["protocols"] == ["http", "https"]
    assert example["regex_priority"] == 0 and example["priority"] == 0 and example["expression"] is None
    assert example["key_auth"] == {"key_names": ["apikey"], "key_in_header": True, "key_in_query": True}
    assert routes["orders-route"]["service"]["port"] == 9000
    assert config["metering"] == []  # no plugin entry anywhere: meter everything, now with the route known


class _File:
    description = "decK file"

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self):
        return load_deck_file(self.path)

    def fingerprint(self):
        return None


def test_the_tutorial_plugin_on_a_service_scopes_one_entry_to_that_service():
    config = gateway_dict(TUTORIAL)
    (entry,) = config["metering"]
    assert entry == {"route": None, "service": "5b5a5dc0-1111-4b8e-9d44-0a0b0c0d0e01", "consumer": None,
                     "meter_api_requests": True, "subject": {"look_up_value_in": "consumer", "field": None},
                     "attributes": [{"source": "header", "name": "x-department", "property": "dept"}],
                     "allow_status_codes": [(200, 299), (404, 404)]}
    internal = config["routes"][1]
    assert internal["service"] == {"id": derived_id("service", "internal"), "name": "internal", "port": 443,
                                   "protocol": "https"}
    assert config["routes"][0]["id"] == "6c6b6ed1-2222-4c9f-8e55-1b1c1d1e1f02"  # the file's own id wins


def test_services_by_fields_and_kongs_defaults():
    document = {"_format_version": "3.0", "services": [
        {"name": "a", "host": "a.internal"},
        {"name": "b", "host": "b.internal", "port": 8443, "protocol": "https"},
        {"name": "c", "url": "grpc://c.internal"},
        {"name": "d", "url": "http://d.internal:8080/base"}],
        "routes": [{"name": f"r-{name}", "service": name, "paths": [f"/{name}"]} for name in "abcd"]}
    services = {r["name"]: r["service"] for r in gateway_dict(document)["routes"]}
    assert [(s["port"], s["protocol"]) for s in services.values()] == [(80, "http"), (8443, "https"), (80, "grpc"),
                                                                        (8080, "http")]


def test_top_level_routes_name_their_service_by_name_or_id_and_keep_file_order():
    document = {"_format_version": "3.0",
                "services": [{"name": "svc", "id": "9d0c0f7e-3333-4aaa-8bbb-2c2d2e2f3a03", "url": "http://x",
                              "routes": [{"name": "nested", "paths": ["/n"]}]}],
                "routes": [{"name": "by-name", "service": "svc", "hosts": ["*.example.com"], "methods": ["GET"],
                            "headers": {"x-version": ["1", "2"]}, "snis": ["a.example.com"], "regex_priority": 5,
                            "protocols": ["https"]},
                           {"name": "by-id", "service": {"id": "9d0c0f7e-3333-4aaa-8bbb-2c2d2e2f3a03"},
                            "paths": ["~/v\\d+/items$"]},
                           {"name": "expr", "expression": 'http.path ^= "/e"', "priority": 7},
                           {"id": "0f0e0d0c-4444-4ccc-9ddd-3e3f3a3b3c04", "paths": ["/no-name"]}]}
    routes = gateway_dict(document)["routes"]
    assert [r["name"] for r in routes] == ["nested", "by-name", "by-id", "expr", None]
    by_name = routes[1]
    assert (by_name["hosts"], by_name["methods"], by_name["headers"], by_name["snis"], by_name["regex_priority"],
            by_name["protocols"]) == (["*.example.com"], ["GET"], {"x-version": ["1", "2"]}, ["a.example.com"], 5,
                                      ["https"])
    assert routes[2]["service"]["id"] == "9d0c0f7e-3333-4aaa-8bbb-2c2d2e2f3a03"
    assert (routes[3]["expression"], routes[3]["priority"], routes[3]["service"]) == ('http.path ^= "/e"', 7, None)
    assert routes[4]["id"] == "0f0e0d0c-4444-4ccc-9ddd-3e3f3a3b3c04"


def test_a_disabled_services_routes_do_not_exist():
    document = {"_format_version": "3.0", "services": [
        {"name": "off", "url": "http://x", "enabled": False, "routes": [{"name": "gone", "paths": ["/"]}]},
        {"name": "on", "url": "http://y", "routes": [{"name": "kept", "paths": ["/on"]}]}]}
    assert [r["name"] for r in gateway_dict(document)["routes"]] == ["kept"]


def test_key_auth_per_route_the_routes_own_then_its_services_then_the_global_one():
    document = {"_format_version": "3.0",
                "plugins": [{"name": "key-auth", "config": {"key_names": ["global-key"]}},
                            {"name": "key-auth", "route": "top", "config": {"key_names": ["top-key"],
                                                                            "key_in_query": False}}],
                "services": [
                    {"name": "svc", "url": "http://x",
                     "plugins": [{"name": "key-auth", "config": {"key_names": ["service-key"]}}],
                     "routes": [{"name": "own", "paths": ["/own"],
                                 "plugins": [{"name": "key-auth", "config": {"key_names": ["route-key"],
                                                                             "key_in_header": False}}]},
                                {"name": "inherits", "paths": ["/inherits"]},
                                {"name": "off", "paths": ["/off"], "plugins": [
                                    {"name": "key-auth", "enabled": False, "config": {"key_names": ["unused"]}}]}]},
                    {"name": "plain", "url": "http://y", "routes": [{"name": "global", "paths": ["/g"]}]}],
                "routes": [{"name": "top", "service": "plain", "paths": ["/top"]}]}
    key_auth = {r["name"]: r["key_auth"] for r in gateway_dict(document)["routes"]}
    assert key_auth == {
        "own": {"key_names": ["route-key"], "key_in_header": False, "key_in_query": True},
        "inherits": {"key_names": ["service-key"], "key_in_header": True, "key_in_query": True},
        "off": {"key_names": ["service-key"], "key_in_header": True, "key_in_query": True},
        "global": {"key_names": ["global-key"], "key_in_header": True, "key_in_query": True},
        "top": {"key_names": ["top-key"], "key_in_header": True, "key_in_query": False},
    }
    # the flags replace the settings on every route, as they do globally
    overridden = gateway_dict(document, Overrides(key_names=("x-key",), no_key_in_header=True))
    assert {r["name"]: r["key_auth"] for r in overridden["routes"]}["inherits"] == \
        {"key_names": ["x-key"], "key_in_header": False, "key_in_query": True}


def test_no_key_auth_anywhere_known_gives_every_route_key_auths_defaults():
    """Nothing says where key-auth looks: its defaults, as without routes (not "no consumer anywhere")."""
    document = {"_format_version": "3.0", "services": [{"name": "s", "url": "http://x",
                                                       "routes": [{"name": "r", "paths": ["/"]}]}]}
    assert gateway_dict(document)["routes"][0]["key_auth"] == {
        "key_names": ["apikey"], "key_in_header": True, "key_in_query": True}


def test_key_auth_on_another_route_only_leaves_this_one_without_a_consumer():
    document = {"_format_version": "3.0", "services": [{"name": "s", "url": "http://x", "routes": [
        {"name": "open", "paths": ["/open"]},
        {"name": "keyed", "paths": ["/"], "plugins": [{"name": "key-auth"}]}]}]}
    routes = {route["name"]: route["key_auth"] for route in gateway_dict(document)["routes"]}
    assert routes["open"] is None and routes["keyed"]["key_names"] == ["apikey"]


def test_neither_routes_nor_entries_is_none_meter_everything_as_before():
    assert gateway_dict({"_format_version": "3.0", "consumers": [{"username": "a"}]}) is None


def test_entries_wherever_decK_allows_them_resolve_to_the_ids_the_credential_table_carries():
    document = {"_format_version": "3.0",
                "services": [{"name": "svc", "url": "http://x", "routes": [
                    {"name": "r1", "paths": ["/1"], "plugins": [{"name": "metering-and-billing", "config": {}}]}]}],
                "routes": [{"name": "r2", "service": "svc", "paths": ["/2"],
                            "plugins": [{"name": "metering-and-billing", "config": {}}]}],
                "consumers": [
                    {"username": "alice", "keyauth_credentials": [{"key": "alice-key"}],
                     "plugins": [{"name": "metering-and-billing", "config": {}}]},
                    {"custom_id": "machine-1", "keyauth_credentials": [{"key": "m1-key"}],
                     "plugins": [{"name": "metering-and-billing", "config": {}}]}],
                "plugins": [{"name": "metering-and-billing", "route": "r1", "consumer": "alice", "config": {}},
                            {"name": "metering-and-billing", "service": "svc", "config": {}},
                            {"name": "metering-and-billing", "enabled": False, "config": {}},
                            {"name": "metering-and-billing", "config": {}}]}
    snapshot = parse_deck(yaml.safe_dump(document), "kong.yaml")
    alice, machine = snapshot.table.lookup("alice-key").id, snapshot.table.lookup("m1-key").id
    r1, r2, svc = derived_id("route", "r1"), derived_id("route", "r2"), derived_id("service", "svc")
    scopes = [(e["route"], e["service"], e["consumer"]) for e in gateway_dict(document)["metering"]]
    assert scopes == [(r1, None, alice), (None, svc, None), (None, None, None), (r1, None, None),
                      (r2, None, None), (None, None, alice), (None, None, machine)]


@pytest.mark.parametrize("plugin, message", [
    ({"name": "metering-and-billing", "service": "nope"}, "kong.yaml: plugins[0].service names no service of the file"),
    ({"name": "metering-and-billing", "consumer": "nobody"},
     "kong.yaml: plugins[0].consumer names no consumer of the file"),
    ({"name": "key-auth", "route": "missing"}, "kong.yaml: plugins[0].route names no route of the file"),
    ({"name": "metering-and-billing", "consumer_group": "gold"},
     "kong.yaml: plugins[0]: a metering-and-billing entry with a consumer_group is not supported"),
    ({"name": "metering-and-billing", "condition": 'http.path == "/x"'},
     "kong.yaml: plugins[0]: a metering-and-billing entry with a condition is not supported"),
])
def test_a_reference_to_nothing_or_a_scope_the_agent_cannot_see_is_refused(plugin, message):
    with pytest.raises(GatewayConfigError) as raised:
        parse_deck(yaml.safe_dump({"_format_version": "3.0", "plugins": [plugin]}), "kong.yaml")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_another_plugins_reference_is_none_of_the_agents_business():
    document = {"_format_version": "3.0", "plugins": [{"name": "rate-limiting", "consumer": "elsewhere"}]}
    assert parse_deck(yaml.safe_dump(document), "kong.yaml").gateway.plugin_entries == ()


@pytest.mark.parametrize("document, message", [
    ({"services": [{"url": "http://x"}]}, "kong.yaml: services[0] has neither id nor name"),
    ({"services": [{"name": "s", "url": "http://x:notaport"}]}, "kong.yaml: services[0].url is not a URL"),
    ({"services": [{"name": "s", "url": "http://x", "routes": [{"name": "r", "paths": "/"}]}]},
     "kong.yaml: services[0].routes[0].paths is not a list of strings"),
    ({"routes": [{"name": "r", "headers": ["x"]}]}, "kong.yaml: routes[0].headers is not a mapping"),
    ({"routes": [{"name": "r", "service": "ghost"}]}, "kong.yaml: routes[0].service names no service in the file"),
    ({"routes": [{"name": "r", "regex_priority": "high"}]}, "kong.yaml: routes[0].regex_priority is not a whole"),
    # Kong's schema refuses these paths (an empty one would otherwise be a prefix of every request)
    ({"routes": [{"name": "r", "paths": ["/ok", ""]}]},
     "kong.yaml: routes[0].paths[1]: '' does not start with / (a prefix) or ~/ (a regex)"),
    ({"routes": [{"name": "r", "paths": ["~^/orders"]}]}, "kong.yaml: routes[0].paths[0]: '~^/orders' does not"),
    ({"routes": [{"name": "r", "paths": ['${{ env "DECK_BASE" }}/orders']}]},
     "kong.yaml: routes[0].paths[0]: decK templates are read only in the metering plugin's api_token"),
    ({"plugins": [{"name": "key-auth", "config": {"key_names": ["api key"]}}]},
     "kong.yaml: plugins[0]: config.key_names: bad key name 'api key': allowed characters are"),
])
def test_malformed_services_and_routes_are_one_line(document, message):
    with pytest.raises(CredentialError) as raised:
        parse_deck(yaml.safe_dump({"_format_version": "3.0", **document}), "kong.yaml")
    assert str(raised.value).startswith(message) and not isinstance(raised.value, GatewayConfigError)


def test_stream_routes_are_not_in_the_http_router():
    document = {"_format_version": "3.0", "services": [{"name": "s", "url": "tcp://x:9000", "routes": [
        {"name": "tls", "protocols": ["tls"], "snis": ["api.example.com"]},
        {"name": "web", "protocols": ["https"], "paths": ["/"]}]}]}
    assert [route["name"] for route in gateway_dict(document)["routes"]] == ["web"]


@pytest.mark.parametrize("field, value", [("priority", -1), ("regex_priority", 2**40), ("priority", 2**50)])
def test_route_numbers_out_of_kongs_bounds_are_one_line(field, value):
    document = {"_format_version": "3.0", "services": [{"name": "s", "url": "http://x", "routes": [
        {"name": "r", "paths": ["/"], field: value}]}]}
    with pytest.raises(CredentialError, match=f"routes\\[0\\].{field} is not between"):
        gateway_dict(document)


def test_a_service_port_out_of_range_is_one_line():
    document = {"_format_version": "3.0", "services": [{"name": "s", "host": "x", "port": 70000}]}
    with pytest.raises(CredentialError, match="port is not between 0 and 65535"):
        gateway_dict(document)
