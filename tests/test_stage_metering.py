"""Metering on its own: finished exchanges (built by hand, as the HTTP stage hands them on) in, Kong-shaped
CloudEvents out; where key-auth finds the key, which subject an event gets, and which exchanges are billed.

The stage is the core's (`agent._core`): its test surface takes exchanges as dicts and gives the events as
the JSON lines the sinks write. The helpers below build those dicts and read the lines back, and wrap the
core in the Python stage's `find_key`, `hide_credentials`, `SubjectResolver` and `Meter`, so that the cases
are the Python stage's."""

from __future__ import annotations

import hashlib
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace

import orjson
import pytest

from agent import _core
from agent._core import EVENT_TYPE
from agent.credentials.key_auth import KeyAuthConfig
from agent.credentials.table import Consumer, CredentialTable
from agent.metering.subject import SubjectError, SubjectRule

CLIENT, SERVER = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
START = 1714557600.25  # 2024-05-01T10:00:00.25Z
ALICE = Consumer("a1b2c3d4-0000-4000-8000-000000000001", "alice", "cust-alice")
NAMELESS = Consumer("a1b2c3d4-0000-4000-8000-000000000002", None, None)
TABLE = CredentialTable.from_keys([("alice-key-7f3e9", ALICE), ("nameless-key-5d21", NAMELESS)])


@dataclass
class Connection:
    client: bytes
    client_port: int
    server: bytes
    server_port: int
    base_seq: int  # the client stream's sequence number at position 0


@dataclass
class Request:
    head: bytes
    method: str
    target: str
    version: str
    start_time: float
    position: int
    size: int


@dataclass
class Exchange:
    connection: Connection
    request: Request
    status: int = 0
    response_size: int = 0
    response_end: float = 0.0
    proxied_by_kong: bool = False   # X-Kong-Upstream-Latency on the final response
    answered_by_kong: bool = False  # X-Kong-Response-Latency on the final response

    def fields(self) -> dict:
        """As `_core.Meter.meter` takes it."""
        connection, request = self.connection, self.request
        return {"client": connection.client, "client_port": connection.client_port, "server": connection.server,
                "server_port": connection.server_port, "base_seq": connection.base_seq, "head": request.head,
                "method": request.method.encode("latin-1"), "target": request.target.encode("latin-1"),
                "version": request.version.encode("latin-1"), "start_time": request.start_time,
                "position": request.position, "size": request.size, "status": self.status,
                "response_size": self.response_size, "response_end": self.response_end,
                "proxied_by_kong": self.proxied_by_kong, "answered_by_kong": self.answered_by_kong}


def new_connection(client_port: int = 40000, first_seq: int = 1001) -> Connection:
    return Connection(CLIENT, client_port, SERVER, 8000, first_seq)


def make_request(target: str = "/orders", headers: tuple[str, ...] = (), method: str = "GET",
                 start: float = START, position: int = 0) -> Request:
    head = "\r\n".join([f"{method} {target} HTTP/1.1", "Host: API.Example.com:8000", "User-Agent: curl/8.5.0",
                        *headers]).encode("latin-1") + b"\r\n\r\n"
    return Request(head, method, target, "1.1", start, position, len(head))


def make_exchange(target: str = "/orders", headers: tuple[str, ...] = ("apikey: alice-key-7f3e9",),
                  status: int = 200, *, connection: Connection | None = None, position: int = 0,
                  start: float = START, end: float = START + 0.25, response_size: int = 312) -> Exchange:
    return Exchange(connection or new_connection(), make_request(target, headers, start=start, position=position),
                    status, response_size, end)


def find_key(request: Request, config: KeyAuthConfig) -> str | None:
    key = _core.find_key(request.head, request.target.encode("latin-1"), list(config.key_names),
                         config.key_in_header, config.key_in_query)
    return None if key is None else key.decode("latin-1")


def hide_credentials(target: str, key_names: tuple[str, ...], key: str | None = None) -> str:
    hidden = _core.hide_credentials(target.encode("latin-1"), list(key_names), None if key is None else key.encode())
    return hidden.decode("latin-1")


NOT_READY = object()


class SubjectResolver:
    """The Python stage's resolver, answered by the core: `resolve` meters the request as a 200."""

    def __init__(self, rule: SubjectRule, key_auth, table) -> None:
        self.rule, self.key_auth, self.table = rule, key_auth, table

    def resolve(self, request: Request) -> tuple[object, None]:
        meter = Meter(self, "gateway-1", self.key_auth)
        events = meter.meter([Exchange(new_connection(), request, 200, 0, request.start_time)])
        if meter.counters.held:
            return NOT_READY, None
        return (events[0]["subject"] if events else None), None


class Meter:
    """The core's meter built as the Python stage's was: before each call the key-auth settings and the
    credential table are read from their callables and pushed in, as the pipeline pushes them."""

    def __init__(self, resolver: SubjectResolver, source: str, key_auth, max_held: int = 100_000) -> None:
        rule = resolver.rule
        name = "" if rule.look_up_value_in == "consumer" else rule.field
        self.core = _core.Meter(source, rule.look_up_value_in, name, max_held)
        self.rule, self.key_auth, self.table = rule, key_auth, resolver.table
        self.pushed: object = None  # the table pushed in last

    def meter(self, exchanges: list[Exchange]) -> list[dict]:
        config = self.key_auth()
        self.core.set_key_auth(list(config.key_names), config.key_in_header, config.key_in_query)
        table = self.table()
        if table is not self.pushed:
            self.core.set_credentials(None if table is None else table.entries(self.rule.field))
            self.pushed = table
        lines = self.core.meter([exchange.fields() for exchange in exchanges], time.monotonic())
        return [orjson.loads(line) for line in lines.splitlines()]

    @property
    def counters(self) -> SimpleNamespace:
        return SimpleNamespace(**self.core.counters)


# ---------------------------------------------------------------- where key-auth finds the key


@pytest.mark.parametrize("target, headers, config, found", [
    ("/a?apikey=from-query", ("apikey: from-header",), KeyAuthConfig(), "from-header"),
    ("/a", ("ApiKey: mixed-case-name",), KeyAuthConfig(), "mixed-case-name"),
    ("/a", ("APIKEY: upper-case-name",), KeyAuthConfig(), "upper-case-name"),
    ("/a?APIKEY=wrong-case", (), KeyAuthConfig(), None),
    ("/a?x=1&apikey=a%2Bb%20c%2F", (), KeyAuthConfig(), "a+b c/"),
    ("/a?api%6Bey=encoded-name", (), KeyAuthConfig(), "encoded-name"),
    ("/a?apikey=first&apikey=second", (), KeyAuthConfig(), "first"),
    ("/a", (), KeyAuthConfig(), None),
    # each name is looked up in every place before the next name
    ("/a?apikey=query-of-first-name", ("token: header-of-second-name",), KeyAuthConfig(("apikey", "token")),
     "query-of-first-name"),
    ("/a?token=query-of-second", (), KeyAuthConfig(("apikey", "token")), "query-of-second"),
    # --no-key-in-header / --no-key-in-query
    ("/a?apikey=from-query", ("apikey: from-header",), KeyAuthConfig(key_in_header=False), "from-query"),
    ("/a", ("apikey: from-header",), KeyAuthConfig(key_in_header=False), None),
    ("/a?apikey=from-query", (), KeyAuthConfig(key_in_query=False), None),
    ("/a?apikey=from-query", ("apikey: from-header",), KeyAuthConfig(key_in_query=False), "from-header"),
])
def test_key_is_found_where_key_auth_looks_for_it(target, headers, config, found):
    assert find_key(make_request(target, headers), config) == found


@pytest.mark.parametrize("target, hidden", [
    ("/a?apikey=k&x=1", "/a?x=1"),
    ("/a?apikey=k", "/a"),
    ("/a?x=%20&apikey=k&y", "/a?x=%20&y"),
    ("/a?x=1&apikey=k1&apikey=k2&z=3", "/a?x=1&z=3"),
    ("/a?api%6Bey=k&x=1", "/a?x=1"),
    ("/a?APIKEY=not-a-key-name&x=1", "/a?APIKEY=not-a-key-name&x=1"),
    ("/a?x=1", "/a?x=1"),
    ("/a", "/a"),
])
def test_hide_credentials_removes_every_key_parameter_and_keeps_the_rest_as_sent(target, hidden):
    assert hide_credentials(target, ("apikey",)) == hidden


@pytest.mark.parametrize("target, hidden", [
    ("/a?APIKEY=K-123&x=1", "/a?x=1"), ("/a?y=2&x=1;apikey=K-123", "/a?y=2"), ("/a?x=1&other=K%2D123", "/a?x=1"),
    ("/a?x=1&apikey%3DK-123", "/a?x=1"), ("/a?x=K-12", "/a?x=K-12"),
])
def test_a_parameter_carrying_the_key_used_is_removed_whatever_its_name(target, hidden):
    assert hide_credentials(target, ("apikey",), "K-123") == hidden


def test_hide_credentials_removes_every_configured_key_name():
    assert hide_credentials("/a?token=t&keep=1&apikey=k", ("apikey", "token")) == "/a?keep=1"


# ---------------------------------------------------------------- subject rules


@pytest.mark.parametrize("spec", ["header:apikey", "header:ApiKey", "query:apikey", "header:token", "query:token"])
def test_subject_rule_refuses_a_field_that_would_put_keys_into_events(spec):
    with pytest.raises(SubjectError, match="API keys"):
        SubjectRule.parse(spec, "username", ("apikey", "token"))


@pytest.mark.parametrize("spec", ["", "bogus", "header:", "query:", "consumer:username", "cookie:session", ":x"])
def test_subject_rule_refuses_bad_specs_with_a_one_line_error(spec):
    with pytest.raises(SubjectError) as refused:
        SubjectRule.parse(spec, "username", ("apikey",))
    assert "\n" not in str(refused.value)


def test_subject_rule_parses_what_kong_accepts():
    assert SubjectRule.parse("consumer", "custom_id", ("apikey",)) == SubjectRule("consumer", "custom_id")
    assert SubjectRule.parse("header:X-Tenant", "username", ("apikey",)) == SubjectRule("header", "x-tenant")
    assert SubjectRule.parse("query:Tenant", "username", ("apikey",)) == SubjectRule("query", "Tenant")


def resolver(rule: SubjectRule, table: CredentialTable | None = TABLE,
             config: KeyAuthConfig = KeyAuthConfig()) -> SubjectResolver:
    return SubjectResolver(rule, lambda: config, lambda: table)


@pytest.mark.parametrize("field, key, subject", [
    ("username", "alice-key-7f3e9", "alice"),
    ("id", "alice-key-7f3e9", ALICE.id),
    ("custom_id", "alice-key-7f3e9", "cust-alice"),
    ("username", "nameless-key-5d21", NAMELESS.id),  # no username: the id, as Kong shows it
    ("custom_id", "nameless-key-5d21", None),
    ("username", "unknown-key", None),
])
def test_consumer_subject_by_field(field, key, subject):
    request = make_request("/a", (f"apikey: {key}",))
    assert resolver(SubjectRule("consumer", field)).resolve(request)[0] == subject


def test_header_and_query_subjects_need_no_credential_table():
    request = make_request("/a?tenant=acme%20corp", ("X-Tenant: globex",))
    by_header = resolver(SubjectRule.parse("header:X-TENANT", "username", ("apikey",)), table=None)
    by_query = resolver(SubjectRule.parse("query:tenant", "username", ("apikey",)), table=None)
    assert by_header.resolve(request)[0] == "globex"
    assert by_query.resolve(request)[0] == "acme corp"
    assert resolver(SubjectRule.parse("query:Tenant", "username", ("apikey",)), table=None).resolve(request)[0] is None


def test_a_subject_field_that_the_gateways_key_auth_names_a_key_is_never_used():
    """At the start only the default key name is known; the gateway's own (here x-api-key) comes later.
    The core reports each change of the settings once, for the pipeline to log it."""
    core = _core.Meter("gateway-1", "header", SubjectRule.parse("header:x-api-key", "username", ("apikey",)).field)
    request = make_request("/a", ("X-Api-Key: SECRET-KEY-1",))

    def subject() -> str | None:
        lines = core.meter([Exchange(new_connection(), request, 200, 0, START).fields()], 0.0)
        return orjson.loads(lines)["subject"] if lines else None

    assert subject() == "SECRET-KEY-1" and not core.subject_names_a_key  # not a key name yet: an ordinary header
    assert core.set_key_auth(["x-api-key"], True, True) is True
    assert core.subject_names_a_key and subject() is None
    assert core.set_key_auth(["x-api-key"], True, True) is False  # the same settings, read again
    assert subject() is None


# ---------------------------------------------------------------- billing rules


class Tables:
    """The credential table as the sync task would swap it in: None until it has loaded."""

    def __init__(self, table: CredentialTable | None) -> None:
        self.table = table


def meter(tables: Tables, max_held: int = 100_000, config: KeyAuthConfig = KeyAuthConfig(),
          rule: SubjectRule = SubjectRule()) -> Meter:
    return Meter(SubjectResolver(rule, lambda: config, lambda: tables.table), "gateway-1", lambda: config, max_held)


def test_a_401_from_the_upstream_is_billed_and_one_from_key_auth_is_not():
    billing = meter(Tables(TABLE))
    by_key_auth, by_upstream = make_exchange("/kong", status=401), make_exchange("/upstream", status=401)
    by_key_auth.answered_by_kong = True  # X-Kong-Response-Latency: 0
    by_upstream.proxied_by_kong = True  # X-Kong-Upstream-Latency: 3
    events = billing.meter([by_key_auth, by_upstream])
    assert [(e["data"]["request_uri"], e["data"]["response_http_status"]) for e in events] == [("/upstream", 401)]
    assert billing.counters.rejected == 1


def test_a_key_name_with_underscores_matches_the_header_with_dashes_as_openresty_does():
    request = make_request("/a", ("x-api-key: dashed",))
    assert find_key(request, KeyAuthConfig(("x_api_key",))) == "dashed"
    assert find_key(make_request("/a", ("x_api_key: underscored",)), KeyAuthConfig(("x_api_key",))) == "underscored"


def test_the_key_used_never_reaches_the_event_under_another_parameter_name():
    billing = meter(Tables(TABLE))
    [event] = billing.meter([make_exchange("/orders?APIKEY=alice-key-7f3e9&page=2")])
    assert event["subject"] == "alice" and event["data"]["request_uri"] == "/orders?page=2"
    assert "alice-key-7f3e9" not in orjson.dumps(event).decode()


def test_a_resolved_request_becomes_one_event():
    billing = meter(Tables(TABLE))
    [event] = billing.meter([make_exchange("/orders?page=2&apikey=alice-key-7f3e9", headers=())])
    assert (event["subject"], event["data"]["request_uri"]) == ("alice", "/orders?page=2")
    assert billing.counters.events == 1


def test_401_is_rejected_and_never_an_event():
    billing = meter(Tables(TABLE))
    assert billing.meter([make_exchange(status=401), make_exchange(headers=(), status=401)]) == []
    assert billing.counters.rejected == 2
    assert billing.counters.events == billing.counters.unresolved == 0


def test_401_is_rejected_even_before_the_table_has_loaded():
    billing = meter(Tables(None))
    assert billing.meter([make_exchange(status=401)]) == []
    assert billing.counters.rejected == 1 and billing.counters.held == 0


@pytest.mark.parametrize("headers", [(), ("apikey: unknown-key",), ("apikey: ",)])
def test_unresolved_requests_are_counted_and_dropped(headers):
    billing = meter(Tables(TABLE))
    assert billing.meter([make_exchange(headers=headers, status=200)]) == []
    assert billing.counters.unresolved == 1 and billing.counters.events == 0


def test_requests_wait_for_the_credential_table_and_none_is_lost():
    tables = Tables(None)
    billing = meter(tables)
    waiting = [make_exchange(f"/held/{n}", position=n * 200) for n in range(3)]
    assert billing.meter(waiting) == []
    assert billing.counters.held == 3 and billing.counters.unresolved == 0
    assert billing.meter([]) == []  # still no table: still held
    assert billing.counters.held == 3
    tables.table = TABLE
    released = billing.meter([])
    assert [event["data"]["request_uri"] for event in released] == ["/held/0", "/held/1", "/held/2"]
    assert billing.counters.held == 0 and billing.counters.events == 3
    assert billing.meter([]) == []


def test_held_requests_go_out_before_newer_ones_when_the_table_appears():
    tables = Tables(None)
    billing = meter(tables)
    billing.meter([make_exchange("/first")])
    tables.table = TABLE
    events = billing.meter([make_exchange("/second", position=300)])
    assert [event["data"]["request_uri"] for event in events] == ["/first", "/second"]


def test_too_many_held_requests_drop_the_oldest_and_count_them():
    tables = Tables(None)
    billing = meter(tables, max_held=2)
    billing.meter([make_exchange(f"/held/{n}", position=n * 200) for n in range(3)])
    assert billing.counters.held_overflow == 1 and billing.counters.unresolved == 1
    assert billing.counters.held == 2
    tables.table = TABLE
    assert [event["data"]["request_uri"] for event in billing.meter([])] == ["/held/1", "/held/2"]


# ---------------------------------------------------------------- the event


def event_for(exchange: Exchange) -> dict:
    """The event of an exchange whose key is alice's."""
    [event] = meter(Tables(TABLE)).meter([exchange])
    assert event["subject"] == "alice"
    return event


def test_event_has_the_cloudevents_attributes_and_kong_fields_with_their_types():
    event = event_for(make_exchange("/orders?page=2&apikey=alice-key-7f3e9", headers=(), response_size=312))
    assert {key: event[key] for key in ("specversion", "type", "source", "subject", "datacontenttype")} == {
        "specversion": "1.0", "type": EVENT_TYPE, "source": "gateway-1", "subject": "alice",
        "datacontenttype": "application/json"}
    assert EVENT_TYPE == "kong.api_request"
    data = event["data"]
    expected = {
        "request_method": "GET", "request_uri": "/orders?page=2", "request_host": "api.example.com",
        "client_ip": "10.0.0.1", "request_user_agent": "curl/8.5.0",
        "request_size_bytes": len(make_request("/orders?page=2&apikey=alice-key-7f3e9").head),
        "response_http_status": 200, "response_size_bytes": 312, "subject_type": "consumer",
    }
    assert {key: data[key] for key in expected} == expected
    for key in ("request_size_bytes", "response_http_status", "response_size_bytes"):
        assert type(data[key]) is int, key
    orjson.dumps(event)  # JSON-ready as the sinks need it


KONG_FIELDS_THE_AGENT_OMITS = ("upstream_status", "route_id", "route_name", "service_id", "service_name",
                               "service_port", "service_protocol")


def test_event_carries_every_kong_field():
    data = event_for(make_exchange())["data"]
    missing = [name for name in KONG_FIELDS_THE_AGENT_OMITS if name not in data]
    assert missing == []
    assert data["service_port"] is None or type(data["service_port"]) is int
    assert all(data[name] is None or isinstance(data[name], str) for name in KONG_FIELDS_THE_AGENT_OMITS
               if name != "service_port")


@pytest.mark.parametrize("start, text", [
    (START, "2024-05-01T10:00:00.250000Z"),
    (0.0, "1970-01-01T00:00:00.000000Z"),
    (1714557600.000001, "2024-05-01T10:00:00.000001Z"),
    (1714557659.5, "2024-05-01T10:00:59.500000Z"),
])
def test_time_is_rfc3339_utc_with_z(start, text):
    event = event_for(make_exchange(start=start, end=start + 0.1))
    assert event["time"] == text
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", event["time"])
    parsed = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - start) < 1e-6 and parsed.utcoffset().total_seconds() == 0


def test_event_id_is_deterministic():
    exchange = make_exchange()
    first, again = event_for(exchange), event_for(exchange)
    rebuilt = event_for(make_exchange())  # the same request seen again (replay, or live and replay)
    assert first["id"] == again["id"] == rebuilt["id"]
    uuid.UUID(first["id"])


def test_event_id_is_a_name_based_version_8_uuid_of_the_connection_and_first_byte():
    """Issue 13: sha256 of `<client hex>:<port>><server hex>:<port>/<sequence number>`, version and variant set."""
    event = event_for(make_exchange(connection=new_connection(first_seq=1001), position=200))
    digest = bytearray(hashlib.sha256(b"0a000001:40000>0a000002:8000/1201").digest()[:16])
    digest[6], digest[8] = (digest[6] & 0x0F) | 0x80, (digest[8] & 0x3F) | 0x80
    parsed = uuid.UUID(event["id"])
    assert event["id"] == str(uuid.UUID(bytes=bytes(digest)))
    assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122)


def test_event_ids_differ_for_two_requests_on_one_connection_and_across_connections():
    connection = new_connection()
    first = make_exchange("/one", connection=connection, position=0)
    second = make_exchange("/two", connection=connection, position=first.request.size)
    elsewhere = make_exchange("/one", connection=new_connection(client_port=40001), position=0)
    ids = {event_for(first)["id"], event_for(second)["id"], event_for(elsewhere)["id"]}
    assert len(ids) == 3


@pytest.mark.parametrize("client_isn", [
    1000,
    0xFFFFFF00,  # sequence numbers wrap between the SYN and the request
])
def test_event_id_does_not_depend_on_where_the_capture_began(client_isn):
    first_seq = (client_isn + 1) & 0xFFFFFFFF
    from_syn = make_exchange(connection=new_connection(first_seq=first_seq), position=300)
    mid_stream = make_exchange(connection=new_connection(first_seq=(first_seq + 300) & 0xFFFFFFFF), position=0)
    assert event_for(from_syn)["id"] == event_for(mid_stream)["id"]


def test_latency_is_from_the_first_request_byte_to_the_last_response_byte():
    data = event_for(make_exchange(start=START, end=START + 0.257))["data"]
    assert data["latency_ms"] == 257
    assert type(data["latency_ms"]) is int


def test_unanswered_request_has_no_latency():
    exchange = make_exchange(status=0, end=0.0, response_size=0)
    data = event_for(exchange)["data"]
    assert data["response_http_status"] == 0 and data["latency_ms"] is None


KEYS = ("hdr-SECRET-1a2b3c", "qry-SECRET+4d5e/6f", "tok-SECRET-7a8b9c")


def test_no_key_value_appears_anywhere_in_the_serialized_event():
    target = "/orders?apikey=qry-SECRET%2B4d5e%2F6f&page=2&token=tok-SECRET-7a8b9c&api%6Bey=qry-SECRET%2B4d5e%2F6f"
    exchange = make_exchange(target, headers=(f"ApiKey: {KEYS[0]}", f"token: {KEYS[2]}"))
    billing = meter(Tables(CredentialTable.from_keys([(KEYS[0], ALICE)])), config=KeyAuthConfig(("apikey", "token")))
    [event] = billing.meter([exchange])
    serialized = orjson.dumps(event)
    for key in KEYS:
        for form in (key, key.replace("+", "%2B").replace("/", "%2F")):
            assert form.encode() not in serialized
    assert b"SECRET" not in serialized
    assert event["data"]["request_uri"] == "/orders?page=2"


def test_a_capture_clock_stepping_back_gives_latency_zero_not_negative():
    [event] = meter(Tables(TABLE)).meter([make_exchange(start=START, end=START - 3600)])
    assert event["data"]["latency_ms"] == 0


@pytest.mark.parametrize("text", ["::", "::1", "::ffff:1.2.3.4", "::1.2.3.4", "::ffff:0:1.2.3.4", "2001:db8::1",
                                  "2001:db8:0:0:1:0:0:1", "1::", "::2", "1:0:3:4:5:6:7:8", "fe80::abcd:0:0:12",
                                  "::1:102:304", "0:0:1::", "1:0:0:1:0:0:0:1"])
def test_client_ip_is_written_as_inet_ntop_writes_it(text):
    address = socket.inet_pton(socket.AF_INET6, text)
    assert _core.ip_text(address) == socket.inet_ntop(socket.AF_INET6, address)


def test_client_ip_of_random_addresses_is_written_as_inet_ntop_writes_it():
    import random
    chooser = random.Random(13)
    for _ in range(5000):
        words = [chooser.choice([0, 0, 0, 1, 0xffff, chooser.randrange(1 << 16)]) for _ in range(8)]
        address = b"".join(word.to_bytes(2, "big") for word in words)
        assert _core.ip_text(address) == socket.inet_ntop(socket.AF_INET6, address)
        v4 = address[:4]
        assert _core.ip_text(v4) == socket.inet_ntop(socket.AF_INET, v4)
