"""The metering-and-billing plugin's config: today's field names and the 3.14 spellings mean the same,
what the agent ignores is accepted, and everything it refuses is one line that names the field and quotes
no value."""

import pytest

from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import Attribute, PluginEntry, Scope, Secret, Subject
from agent.gateway.plugin_config import read_entry

SECRET = "spat_0123456789abcdef"
CURRENT = {
    "ingest_endpoint": "https://us.api.konghq.com/v3/openmeter/events",
    "api_token": SECRET,
    "meter_api_requests": True,
    "meter_ai_token_usage": False,
    "subject": {"look_up_value_in": "header", "field": "X-Tenant-Id"},
    "attributes": [{"source": "header", "look_up_value_in": "X-Department", "event_property_name": "department"},
                   {"source": "query", "look_up_value_in": "Project", "event_property_name": "project"}],
    "allow_status_codes": ["200-299", "404", 418],
    "ssl_verify": True, "timeout": 10000, "keepalive": 60000,
    "queue": {"max_batch_size": 1, "max_coalescing_delay": 1, "max_entries": 10000, "max_bytes": None,
              "max_retry_time": 60, "initial_retry_delay": 0.01, "max_retry_delay": 60, "concurrency_limit": 1},
}
OLD = {
    "http_endpoint": "https://us.api.konghq.com/v3/openmeter/events",
    "auth_token": SECRET,
    "enable_api_requests": True,
    "enable_ai_llm": False,
    "subject": {"in": "header", "field": "X-Tenant-Id"},
    "attributes": [{"in": "header", "field": "X-Department", "key": "department"},
                   {"in": "query", "field": "Project", "key": "project"}],
    "allow_status_codes": ["200-299", "404", 418],
}


def read(config: object, where: str = "kong.yaml: plugins[0]"):
    return read_entry(PluginEntry(where, Scope(service="s-1"), config))


def test_current_and_older_spellings_read_the_same():
    current, old = read(CURRENT), read(OLD)
    assert current == old
    assert current.scope == Scope(service="s-1")
    assert current.subject == Subject("header", "x-tenant-id")  # header names compare case-insensitively
    assert current.attributes == (Attribute("header", "x-department", "department"),
                                  Attribute("query", "Project", "project"))  # query names are as given
    assert current.allow_status_codes == ((200, 299), (404, 404), (418, 418))
    assert current.ingest_endpoint == CURRENT["ingest_endpoint"] and current.api_token == Secret(SECRET)
    assert SECRET not in repr(current)


def test_defaults_and_nulls_as_the_admin_api_returns_them():
    entry = read({"ingest_endpoint": None, "api_token": None, "subject": {"look_up_value_in": "consumer",
                                                                          "field": None},
                  "attributes": None, "allow_status_codes": None, "meter_api_requests": None})
    assert (entry.meter_api_requests, entry.subject, entry.attributes, entry.allow_status_codes,
            entry.ingest_endpoint, entry.api_token) == (True, Subject(), (), None, None, None)
    assert read(None) == entry
    assert read({"allow_status_codes": []}).allow_status_codes is None  # empty: every status, as statsd's
    assert read({"meter_api_requests": False}).meter_api_requests is False


@pytest.mark.parametrize("config, message", [
    ({"ingest_endpoint": "x", "api_tokn": SECRET}, "config.api_tokn is not a metering-and-billing setting"),
    ({"queue": {"max_batch_size": 1, "flush": 2}}, "config.queue.flush is not a metering-and-billing queue setting"),
    ({"subject": {"look_up_value_in": "consumer", "name": "x"}}, "config.subject.name is not a subject setting"),
    ({"attributes": [{"source": "header", "look_up_value_in": "a", "event_property_name": "b", "x": 1}]},
     "config.attributes[0].x is not an attribute setting"),
    ({"subject": {"look_up_value_in": "application"}},
     "config.subject.look_up_value_in application is not supported: the agent cannot see Dev Portal applications"),
    ({"subject": {"in": "application"}}, "config.subject.look_up_value_in application is not supported"),
    ({"subject": {"look_up_value_in": "cookie", "field": "c"}},
     "config.subject.look_up_value_in is not consumer, header or query"),
    ({"subject": {"look_up_value_in": "header"}}, "config.subject.field is required with look_up_value_in header"),
    ({"subject": {"look_up_value_in": "query", "field": ""}},
     "config.subject.field is required with look_up_value_in query"),
    ({"attributes": [{"source": "body", "look_up_value_in": "a", "event_property_name": "b"}]},
     "config.attributes[0].source is not header or query"),
    ({"attributes": [{"source": "header", "look_up_value_in": "a", "key": "b"}]},
     "config.attributes[0] mixes the current spelling"),
    ({"attributes": [{"source": "header", "look_up_value_in": "X-Method", "event_property_name": "request_method"}]},
     "config.attributes[0].event_property_name names one of the event's own data fields"),
    ({"attributes": [{"in": "query", "field": "lat", "key": "latency_ms"}]},
     "config.attributes[0].key names one of the event's own data fields"),
    ({"attributes": [{"source": "header", "look_up_value_in": "", "event_property_name": "b"}]},
     "config.attributes[0].look_up_value_in is not a non-empty string"),
    ({"allow_status_codes": ["2xx"]}, "config.allow_status_codes[0] is not a status code or a range"),
    ({"allow_status_codes": ["200-299", "299-200"]}, "config.allow_status_codes[1] is not a status code or a range"),
    ({"allow_status_codes": "200-299"}, "config.allow_status_codes is not a list"),
    ({"ingest_endpoint": "https://a", "http_endpoint": "https://b"},
     "config gives both ingest_endpoint and its older spelling http_endpoint"),
    ({"api_token": 12345}, "config.api_token is not a string"),
    ({"meter_api_requests": "yes"}, "config.meter_api_requests is not true or false"),
    ({"ssl_verify": "no"}, "config.ssl_verify is not true or false"),
    ({"timeout": "10s"}, "config.timeout is not a number"),
    ("ingest_endpoint=x", "config is not a mapping"),
])
def test_every_refusal_is_one_line_naming_the_field_and_where(config, message):
    with pytest.raises(GatewayConfigError) as raised:
        read(config)
    text = str(raised.value)
    assert text.startswith(f"kong.yaml: plugins[0]: {message}"), text
    assert "\n" not in text


def test_no_refusal_quotes_a_value():
    for config in ({"unknown": SECRET, "api_token": SECRET}, {"api_token": [SECRET]},
                   {"subject": {"look_up_value_in": SECRET}}, {"allow_status_codes": [SECRET]},
                   {"attributes": [{"source": SECRET, "look_up_value_in": "a", "event_property_name": "b"}]},
                   {SECRET: 1}, {"queue": {SECRET: 1}}):
        with pytest.raises(GatewayConfigError) as raised:
            read(config)
        assert SECRET not in str(raised.value), config
