"""The Admin API double answers what Kong's published contract says, and the agent asks what it allows:
checked with openapi-core against ../shared/contracts/kong-admin-read.openapi.yaml (read, never copied)."""

import json
from pathlib import Path

import httpx
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from agent.credentials.admin_api import AdminApiSource
from tests.doubles.kong_admin import KongAdminDouble

SPEC = Path(__file__).resolve().parents[1] / ".." / "shared" / "contracts" / "kong-admin-read.openapi.yaml"
TOKEN = "contract-token"
pytestmark = pytest.mark.filterwarnings("ignore:Use of allowEmptyValue:DeprecationWarning")  # in the spec


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_path(SPEC.resolve())


@pytest.fixture
def kong():
    with KongAdminDouble(token=TOKEN) as double:
        for n in range(5):
            double.add_consumer(username=f"user-{n}", custom_id=None if n % 2 else f"cust-{n}")
            double.add_key(f"user-{n}", f"key-{n}", ttl=600 if n == 3 else None)
        double.add_consumer(username="team-user", workspace="team-a")
        double.add_key("team-user", "team-key", workspace="team-a")
        double.add_plugin("key-auth", {"key_names": ["apikey"], "key_in_header": True, "key_in_query": True,
                                       "key_in_body": False, "hide_credentials": False, "anonymous": None})
        double.add_service("example-service", host="httpbin.konghq.com")
        double.add_service("billing", host="billing.internal", port=8443, protocol="https", enabled=False)
        double.add_route("example-service", name="example-route", paths=["/anything"],
                         headers={"x-version": ["1", "2"]}, methods=["GET"])
        double.add_route("billing", name="expression-route", expression='http.path ^= "/bill"', priority=10)
        double.add_route(None, name="no-service", hosts=["*.example.com"])
        double.add_plugin("metering-and-billing", {"ingest_endpoint": "https://ingest.example/v3/openmeter/events",
                                                   "meter_api_requests": True, "subject": {"look_up_value_in":
                                                                                           "consumer"}},
                          service="example-service", consumer="user-1")
        double.add_plugin("metering-and-billing", {"meter_api_requests": True}, route="example-route")
        double.add_service("team-service", workspace="team-a")
        double.add_route("team-service", name="team-route", paths=["/team"], workspace="team-a")
        yield double


def contract_errors(openapi: OpenAPI, path: str, query: dict, status: int, body: bytes) -> list[str]:
    """Every way the answer departs from the contract, except one the contract itself allows in words:
    the spec is OpenAPI 3.1, where the 3.0 keyword `nullable: true` (and "may be null" in `next`'s
    description) no longer lets a value be null, yet Kong returns nulls there (`"next": null` on a last page,
    `"custom_id": null`); a null is accepted exactly where the spec says so, inside a `oneOf` too (a route is
    a traditional or an expression route: exactly one of the two must fit)."""
    request = MockRequest("http://127.0.0.1:8001", "get", path, args=query)
    response = MockResponse(body, status_code=status, content_type="application/json")
    errors = []
    for error in openapi.iter_response_errors(request, response):
        for detail in getattr(error.__cause__, "schema_errors", None) or [error]:
            errors.extend(_departures(detail))
    return errors


def _departures(detail) -> list[str]:
    schema = getattr(detail, "schema", {}) or {}
    validator = getattr(detail, "validator", None)
    if validator == "oneOf" and getattr(detail, "context", None):
        branches: dict[int, list] = {index: [] for index in range(len(schema["oneOf"]))}
        for sub in detail.context:
            branches[sub.schema_path[0]].extend(_departures(sub))
        if sum(1 for departures in branches.values() if not departures) == 1:
            return []
    allowed_null = (validator == "type" and detail.instance is None
                    and (schema.get("nullable") is True or "may be null" in schema.get("description", "")))
    return [] if allowed_null else [str(getattr(detail, "message", detail))]


@pytest.mark.parametrize("path, query", [
    ("/consumers", {"size": "2"}),
    ("/consumers", {}),
    ("/team-a/consumers", {}),
    ("/consumers/user-1", {}),
    ("/consumers/user-1/key-auth", {}),
    ("/team-a/consumers/team-user/key-auth", {}),
    ("/key-auths", {"size": "1000"}),
    ("/team-a/key-auths", {}),
    ("/plugins", {}),
    ("/team-a/plugins", {}),
    ("/services", {}),
    ("/services", {"size": "1"}),
    ("/team-a/services", {}),
    ("/routes", {}),
    ("/routes", {"size": "1"}),
    ("/team-a/routes", {}),
])
def test_double_answers_follow_the_contract(openapi, kong, path, query):
    response = httpx.get(kong.url + path, params=query, headers={"Kong-Admin-Token": TOKEN})
    assert response.status_code == 200
    assert contract_errors(openapi, path, query, 200, response.content) == []


def test_every_page_of_a_paginated_list_follows_the_contract(openapi, kong):
    query = {"size": "2"}
    pages = 0
    while True:
        response = httpx.get(kong.url + "/key-auths", params=query, headers={"Kong-Admin-Token": TOKEN})
        assert contract_errors(openapi, "/key-auths", query, response.status_code, response.content) == []
        page = response.json()
        pages += 1
        if page["next"] is None:
            break
        assert page["next"].startswith("/key-auths?offset=")
        query = {"size": "2", "offset": page["offset"]}
    assert pages == 3


@pytest.mark.parametrize("headers", [{}, {"Kong-Admin-Token": "wrong"}])
def test_401_without_the_right_token_follows_the_contract(openapi, kong, headers):
    response = httpx.get(kong.url + "/consumers", headers=headers)
    assert response.status_code == 401
    assert contract_errors(openapi, "/consumers", {}, 401, response.content) == []
    assert set(response.json()) == {"message", "status"}


def test_the_check_catches_a_departure(openapi):
    body = json.dumps({"data": [{"id": "c1", "username": 7, "nickname": "x"}], "next": None}).encode()
    assert len(contract_errors(openapi, "/consumers", {}, 200, body)) == 2  # wrong type, unknown field


@pytest.mark.parametrize("route", [
    {"id": "r1", "paths": ["/"], "expression": 'http.path == "/"'},  # both kinds at once: neither fits
    {"id": "r1", "paths": "/"},                                        # a path that is not a list
    {"id": "r1", "paths": None, "nickname": "x"},                      # a field routes do not have
])
def test_the_check_catches_a_route_that_is_neither_kind(openapi, route):
    body = json.dumps({"data": [route], "next": None}).encode()
    assert contract_errors(openapi, "/routes", {}, 200, body) != []


def test_agent_requests_follow_the_contract(openapi, kong):
    AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": TOKEN}).load()
    AdminApiSource(kong.url + "/team-a", environ={"KONG_ADMIN_TOKEN": TOKEN}).load()
    assert len(kong.requests) == 10  # consumers, key-auths, plugins, services, routes: twice
    for recorded in kong.requests:
        request = MockRequest("http://127.0.0.1:8001", "get", recorded.path, args=recorded.query,
                              headers=recorded.headers)
        assert list(openapi.iter_request_errors(request)) == [], recorded
