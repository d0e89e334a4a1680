"""Which route Kong picks, case by case, from Kong's documented routing rules (the proxy reference's
"Routes and matching capabilities" and "Matching priorities", `traditional_compatible` flavor).

Each case is a decK snippet, a request, and the route Kong's documentation says answers it (None: Kong's
`404 no Route matched`). The snippet goes through the agent's own decK reader and the translation into
the core, so the whole path from a user's file to the match is what is checked.
"""

from __future__ import annotations

import pytest
import yaml

from agent import _core
from agent.gateway.core_config import Overrides, core_gateway
from agent.gateway.deck import gateway_from_deck

CASES = [
    # hosts: any one of them; a leading or trailing wildcard label; host:port also needs the port
    ("hosts any of", """
     - {name: a, hosts: [example.com, service.com]}""",
     "GET /x", ["Host: service.com"], "a"),
    ("hosts none of", """
     - {name: a, hosts: [example.com]}""",
     "GET /x", ["Host: other.com"], None),
    ("leftmost wildcard", """
     - {name: a, hosts: ["*.example.com"]}""",
     "GET /", ["Host: a.example.com"], "a"),
    ("leftmost wildcard needs a label", """
     - {name: a, hosts: ["*.example.com"]}""",
     "GET /", ["Host: example.com"], None),
    ("rightmost wildcard", """
     - {name: a, hosts: ["example.*"]}""",
     "GET /", ["Host: example.org"], "a"),
    ("host with its port", """
     - {name: a, hosts: ["example.com:8000"]}
     - {name: b, hosts: ["example.com:9000"]}""",
     "GET /", ["Host: example.com:9000"], "b"),
    ("host port defaults to the listener's", """
     - {name: a, hosts: ["example.com:8000"]}""",
     "GET /", ["Host: example.com"], "a"),
    # paths: prefix on the normalized path, case-sensitive
    ("path prefix", """
     - {name: a, paths: [/service]}""",
     "GET /service/resource?x=1", [], "a"),
    ("path is not a substring", """
     - {name: a, paths: [/service]}""",
     "GET /hello/service", [], None),
    ("paths are case-sensitive", """
     - {name: a, paths: [/service]}""",
     "GET /Service", [], None),
    ("normalized: percent-encoding", """
     - {name: a, paths: [/service]}""",
     "GET /%73ervice", [], "a"),
    ("normalized: dot segments", """
     - {name: a, paths: [/service]}""",
     "GET /other/../service/x", [], "a"),
    ("longest prefix wins", """
     - {name: root, paths: [/]}
     - {name: service, paths: [/service]}""",
     "GET /service/resource", [], "service"),
    # regex paths: anchored at the start, over prefixes, ordered by regex_priority
    ("regex path", """
     - {name: a, paths: ['~/users/\\d+/profile$']}""",
     "GET /users/42/profile", [], "a"),
    ("regex path is anchored at the start", """
     - {name: a, paths: ['~/users/\\d+']}""",
     "GET /v1/users/42", [], None),
    ("regex over prefix", """
     - {name: prefix, paths: [/version]}
     - {name: regex, paths: ['~/version/\\d+/status/\\d+']}""",
     "GET /version/1/status/200", [], "regex"),
    ("higher regex_priority first", """
     - {name: status, paths: ['~/status/\\d+'], regex_priority: 0}
     - {name: version, paths: ['~/version/\\d+/status/\\d+'], regex_priority: 6}
     - {name: any, paths: ['~/\\w+/\\d+'], regex_priority: 3}""",
     "GET /version/1/status/200", [], "version"),
    # methods and headers
    ("methods any of", """
     - {name: a, methods: [GET, HEAD]}""",
     "HEAD /", [], "a"),
    ("a method not listed", """
     - {name: a, methods: [GET, HEAD]}""",
     "POST /", [], None),
    ("header values any of, case-insensitive", """
     - {name: a, headers: {version: [v1, v2]}}""",
     "GET /", ["Version: V2"], "a"),
    ("every header named", """
     - {name: a, headers: {version: [v1], region: [eu]}}""",
     "GET /", ["version: v1"], None),
    # priorities between routes that all match
    ("more fields first", """
     - {name: host, hosts: [example.com], paths: [/orders/new]}
     - {name: host-method-path, hosts: [example.com], methods: [POST], paths: [/]}""",
     "POST /orders/new", ["Host: example.com"], "host-method-path"),
    ("plain hosts over wildcards", """
     - {name: wild, hosts: ["*.example.com"]}
     - {name: plain, hosts: [api.example.com]}""",
     "GET /", ["Host: api.example.com"], "plain"),
    ("more headers first", """
     - {name: one, headers: {version: [v1]}}
     - {name: two, headers: {version: [v1], region: [eu]}}""",
     "GET /", ["version: v1", "region: eu"], "two"),
    # SNIs do not constrain plain HTTP
    ("snis ignored for http", """
     - {name: a, paths: [/], snis: [api.example.com]}""",
     "GET /x", [], "a"),
    # the expressions flavor
    ("expression route", """
     - {name: expr, expression: 'http.path ^= "/v2" && http.method == "GET"', priority: 10}
     - {name: other, expression: 'http.path ^= "/"', priority: 1}""",
     "GET /v2/orders", [], "expr"),
]


def core_routes(routes: list[dict]) -> list[dict]:
    """The routes as the core takes them, read from a decK file holding them in one service."""
    document = {"_format_version": "3.0", "services": [{"name": "svc", "url": "http://upstream.test", "routes": routes}]}
    return core_gateway(gateway_from_deck(document, "case.yaml"), Overrides())["routes"]


@pytest.mark.parametrize("snippet, request_line, headers, expected", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_kong_picks_the_documented_route(snippet, request_line, headers, expected):
    specs = core_routes(yaml.safe_load(snippet))
    routes = _core.Routes(specs)
    assert routes.refused == []
    names = {route["id"]: route["name"] for route in specs}
    head = "\r\n".join([f"{request_line} HTTP/1.1", *headers, "", ""]).encode()
    matched = routes.route_of(head, 8000)
    assert (names[matched] if matched is not None else None) == expected


def test_a_route_the_router_refuses_is_named():
    routes = _core.Routes(core_routes([{"name": "broken", "expression": "http.path ^^ nope"},
                                       {"name": "fine", "paths": ["/"]}]))
    assert len(routes.refused) == 1 and "broken" in routes.refused[0]
