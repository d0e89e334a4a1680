"""Metering on its own: finished exchanges (built by hand, as the HTTP stage hands them on) in, Kong-shaped
CloudEvents out; where key-auth finds the key, which subject an event gets, and which exchanges are billed."""

from __future__ import annotations

import re
import uuid
from datetime import datetime

import orjson
import pytest

from agent.credentials.key_auth import KeyAuthConfig
from agent.credentials.table import Consumer, CredentialTable
from agent.http.exchanges import Exchange
from agent.http.message import Message
from agent.metering.events import EVENT_TYPE, build_event
from agent.metering.key_lookup import find_key, hide_credentials
from agent.metering.meter import Meter
from agent.metering.subject import SubjectError, SubjectResolver, SubjectRule
from agent.tcp.reassembly import Connection

CLIENT, SERVER = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
START = 1714557600.25  # 2024-05-01T10:00:00.25Z
ALICE = Consumer("a1b2c3d4-0000-4000-8000-000000000001", "alice", "cust-alice")
NAMELESS = Consumer("a1b2c3d4-0000-4000-8000-000000000002", None, None)
TABLE = CredentialTable.from_keys([("alice-key-7f3e9", ALICE), ("nameless-key-5d21", NAMELESS)])


def new_connection(client_port: int = 40000, first_seq: int = 1001) -> Connection:
    connection = Connection(CLIENT, client_port, SERVER, 8000, START, saw_syn=True)
    connection.to_server.start(first_seq)
    return connection


def make_request(target: str = "/orders", headers: tuple[str, ...] = (), method: str = "GET",
                 start: float = START, position: int = 0) -> Message:
    head = "\r\n".join([f"{method} {target} HTTP/1.1", "Host: API.Example.com:8000", "User-Agent: curl/8.5.0",
                        *headers]).encode("latin-1") + b"\r\n\r\n"
    message = Message(start, position, -1)
    message.head, message.size, message.head_end = head, len(head), position + len(head)
    message.method, message.target, message.version = method, target, "1.1"
    message.end_time = start
    return message


def make_exchange(target: str = "/orders", headers: tuple[str, ...] = ("apikey: alice-key-7f3e9",),
                  status: int = 200, *, connection: Connection | None = None, position: int = 0,
                  start: float = START, end: float = START + 0.25, response_size: int = 312) -> Exchange:
    exchange = Exchange(connection or new_connection(), make_request(target, headers, start=start, position=position))
    exchange.status, exchange.response_size, exchange.response_end = status, response_size, end
    exchange.request_done = exchange.response_done = True
    return exchange


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


def test_a_subject_field_that_the_gateways_key_auth_names_a_key_is_never_used(caplog):
    """At the start only the default key name is known; the gateway's own (here x-api-key) comes later."""
    settings = [KeyAuthConfig()]
    by_header = SubjectResolver(SubjectRule.parse("header:x-api-key", "username", ("apikey",)),
                                lambda: settings[-1], lambda: None)
    request = make_request("/a", ("X-Api-Key: SECRET-KEY-1",))
    assert by_header.resolve(request)[0] == "SECRET-KEY-1"  # not a key name yet: an ordinary header
    settings.append(KeyAuthConfig(("x-api-key",)))
    assert by_header.resolve(request)[0] is None
    settings.append(KeyAuthConfig(("x-api-key",)))  # the same settings, read again
    assert by_header.resolve(request)[0] is None
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "SECRET-KEY-1" not in errors[0]


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
    by_key_auth.response = Message(START, 0)
    by_key_auth.response.head = (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Key\r\n"
                                 b"X-Kong-Response-Latency: 0\r\n\r\n")
    by_upstream.response = Message(START, 0)
    by_upstream.response.head = b"HTTP/1.1 401 Unauthorized\r\nX-Kong-Upstream-Latency: 3\r\n\r\n"
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


def event_for(exchange: Exchange, subject: str = "alice", key_names: tuple[str, ...] = ("apikey",)) -> dict:
    return build_event(exchange, subject, "consumer", "gateway-1", key_names)


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


def test_event_id_is_the_name_based_version_8_uuid_of_the_connection_and_first_byte():
    """The formula the Rust port shares: SHA-256 of the name, version 8 and the RFC 4122 variant set."""
    import hashlib
    exchange = make_exchange(connection=new_connection(client_port=40000, first_seq=1001), position=0)
    name = b"%s/%d" % (f"{CLIENT.hex()}:40000>{SERVER.hex()}:8000".encode(), 1001)
    digest = bytearray(hashlib.sha256(name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x3F) | 0x80
    event_id = event_for(exchange)["id"]
    assert event_id == str(uuid.UUID(bytes=bytes(digest)))
    assert uuid.UUID(event_id).version == 8 and uuid.UUID(event_id).variant == uuid.RFC_4122
