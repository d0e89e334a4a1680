"""Routes, services and plugin entries from Kong's Admin API (through the contract-following double):
pages, Kong's creation order, workspaces, Kong's `{"id": ...}` references, and an RBAC token that may read
the credentials but not these lists."""

import logging

import pytest

from agent.credentials.admin_api import AdminApiSource
from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import KeyAuthConfig
from agent.gateway.core_config import Overrides, core_gateway
from agent.gateway.source import GatewaySource
from tests.doubles.kong_admin import KongAdminDouble


@pytest.fixture
def kong():
    with KongAdminDouble() as double:
        yield double


def gateway(url: str) -> dict | None:
    return core_gateway(GatewaySource(AdminApiSource(url), None, Overrides()).load().gateway, Overrides())


def test_the_tutorial_setup_as_the_admin_api_lists_it(kong):
    service = kong.add_service("example-service", host="httpbin.konghq.com")
    route = kong.add_route("example-service", name="example-route", paths=["/anything"], created_at=1_700_000_000)
    kong.add_service("internal", host="internal.example", port=8443, protocol="https")
    kong.add_route("internal", name="internal-route", paths=["/internal"], methods=["POST"],
                   headers={"x-version": ["2"]}, created_at=1_700_000_001)
    kong.add_plugin("key-auth", {"key_names": ["apikey"], "key_in_header": True, "key_in_query": True,
                                 "key_in_body": False, "hide_credentials": False})
    alice = kong.add_consumer(username="alice")
    kong.add_plugin("metering-and-billing", {"ingest_endpoint": "https://us.api.konghq.com/v3/openmeter/events",
                                             "api_token": None, "meter_api_requests": True,
                                             "meter_ai_token_usage": True,
                                             "subject": {"look_up_value_in": "consumer", "field": None},
                                             "attributes": None, "allow_status_codes": None, "ssl_verify": True,
                                             "timeout": 10000, "keepalive": 60000, "queue": None},
                    service="example-service")
    kong.add_plugin("metering-and-billing", {}, route="internal-route", consumer="alice")
    config = gateway(kong.url)
    example, internal = config["routes"]
    assert (example["id"], example["name"], example["paths"]) == (route["id"], "example-route", ["/anything"])
    assert example["service"] == {"id": service["id"], "name": "example-service", "port": 80, "protocol": "http"}
    assert example["key_auth"] == {"key_names": ["apikey"], "key_in_header": True, "key_in_query": True}
    assert internal["service"]["port"] == 8443 and internal["service"]["protocol"] == "https"
    assert (internal["methods"], internal["headers"]) == (["POST"], {"x-version": ["2"]})
    scopes = {(e["route"], e["service"], e["consumer"]) for e in config["metering"]}
    assert scopes == {(None, service["id"], None), (internal["id"], None, alice["id"])}


def test_routes_come_in_the_order_kong_made_them_across_pages(kong):
    kong.add_service("svc")
    made = [kong.add_route("svc", name=f"r{n}", paths=[f"/{n}"], created_at=1_700_000_000 + n // 2)
            for n in range(1500)]  # two pages of 1000; pairs made in the same second
    routes = gateway(kong.url)["routes"]
    expected = sorted(made, key=lambda r: (r["created_at"], r["id"]))
    assert [r["id"] for r in routes] == [r["id"] for r in expected]
    assert len([r for r in kong.requests if r.path == "/routes"]) == 2


def test_a_workspace_reads_only_its_own(kong):
    kong.add_service("default-service")
    kong.add_route("default-service", name="default-route", paths=["/"])
    kong.add_service("team-service", workspace="team-a")
    kong.add_route("team-service", name="team-route", paths=["/team"], workspace="team-a")
    kong.add_plugin("metering-and-billing", {}, service="team-service", workspace="team-a")
    config = gateway(kong.url + "/team-a")
    assert [r["name"] for r in config["routes"]] == ["team-route"] and len(config["metering"]) == 1
    assert {r.path for r in kong.requests} >= {"/team-a/services", "/team-a/routes"}


def test_disabled_services_and_plugins(kong):
    kong.add_service("off", enabled=False)
    kong.add_route("off", name="gone", paths=["/off"])
    kong.add_service("on")
    kong.add_route("on", name="kept", paths=["/on"])
    kong.add_plugin("metering-and-billing", {}, enabled=False)
    config = gateway(kong.url)
    assert [r["name"] for r in config["routes"]] == ["kept"] and config["metering"] == []


def test_expression_routes(kong):
    kong.add_service("svc")
    kong.add_route("svc", name="expr", expression='http.path ^= "/v2" && http.method == "GET"', priority=100)
    (route,) = gateway(kong.url)["routes"]
    assert (route["expression"], route["priority"], route["paths"]) == (
        'http.path ^= "/v2" && http.method == "GET"', 100, [])


@pytest.mark.parametrize("forbidden", ["/services", "/routes"])
def test_rbac_that_hides_services_or_routes_warns_once_and_knows_no_routes(kong, caplog, forbidden):
    kong.add_service("svc")
    kong.add_route("svc", name="r", paths=["/"])
    kong.add_consumer(username="alice")
    kong.add_key("alice", "alice-key")
    kong.add_plugin("key-auth", {"key_names": ["apikey"]})
    source = GatewaySource(AdminApiSource(kong.url), None, Overrides())

    def deny(request):
        if request.path == forbidden:
            kong.fail_next(1, status=403)

    kong.before_answer = deny
    with caplog.at_level(logging.WARNING):
        first = source.load()
        second = source.load()
    assert first.table.lookup("alice-key").username == "alice"
    assert first.key_auth == KeyAuthConfig(("apikey",), True, True, False)
    assert first.gateway.routes == () and second.gateway.routes == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"does not let this token read {forbidden}" in warnings[0]


def test_rbac_that_hides_plugins_reads_no_entry_and_meters_everything(kong, caplog):
    kong.add_service("svc")
    kong.add_route("svc", name="r", paths=["/"])
    kong.add_plugin("metering-and-billing", {}, service="svc")
    kong.before_answer = lambda request: kong.fail_next(1, status=403) if request.path == "/plugins" else None
    with caplog.at_level(logging.WARNING):
        config = gateway(kong.url)
    assert [r["name"] for r in config["routes"]] == ["r"] and config["metering"] == []
    assert "no metering-and-billing entry is read" in caplog.text


def test_a_malformed_route_page_is_one_line(kong):
    kong.add_service("svc")
    route = kong.add_route("svc", name="r", paths=["/"])
    route["paths"] = "/"  # not a list, as no Kong would answer
    with pytest.raises(CredentialError, match=r"malformed page from GET /routes page 1: data\[0\]\.paths is not a "
                                              r"list of strings$"):
        gateway(kong.url)


def test_a_refused_metering_entry_names_the_plugin_by_id(kong):
    plugin = kong.add_plugin("metering-and-billing", {"subject": {"look_up_value_in": "application"}})
    with pytest.raises(CredentialError) as raised:
        gateway(kong.url)
    assert str(raised.value).startswith(f"Admin API {kong.url}: plugin {plugin['id']}: config.subject.look_up_value_in"
                                        " application is not supported")
