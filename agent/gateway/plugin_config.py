"""The metering-and-billing plugin's `config`, as Kong's schema spells it today and as the 3.14 schema did.

Current names: `ingest_endpoint`, `api_token`, `meter_api_requests`, `meter_ai_token_usage`,
`subject.look_up_value_in` / `subject.field`, `attributes[]` as `{source, look_up_value_in,
event_property_name}`, `allow_status_codes` (3.16), `ssl_verify`, `timeout`, `keepalive`, `queue.*`.
The 3.14 spellings: `http_endpoint`, `auth_token`, `enable_api_requests`, `enable_ai_llm`, `subject.in`,
attributes as `{in, field, key}`. A field given null means its default, as in Kong's Admin API answers.

The agent takes what decides which requests are billed and how: the subject, the attributes, the status
filter, `meter_api_requests`, the endpoint and its token. `meter_ai_token_usage` (AI token events), the
queue, the timeouts and `ssl_verify` are accepted and ignored: the agent has its own delivery (the spool,
`--insecure-skip-tls-verify`, `--ingest-ca-file`). Anything else is refused with one line naming the field.
Messages never quote a value: a token or a key may be anywhere in a mistyped config.
"""

from __future__ import annotations

import re

from agent.flags import shown_name
from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import Attribute, MeteringEntry, PluginEntry, Secret, Subject

NAME = "metering-and-billing"

# current name -> the 3.14 spelling of the same setting
_RENAMED = {"ingest_endpoint": "http_endpoint", "api_token": "auth_token",
            "meter_api_requests": "enable_api_requests", "meter_ai_token_usage": "enable_ai_llm"}
_IGNORED_BOOLS = ("meter_ai_token_usage", "ssl_verify")
_IGNORED_NUMBERS = ("timeout", "keepalive")
_QUEUE_FIELDS = frozenset({"max_batch_size", "max_coalescing_delay", "max_entries", "max_bytes", "max_retry_time",
                           "initial_retry_delay", "max_retry_delay", "concurrency_limit"})
_KNOWN = frozenset({*_RENAMED, *_RENAMED.values(), *_IGNORED_NUMBERS, "ssl_verify", "subject", "attributes",
                    "allow_status_codes", "queue"})
_SUBJECT_KINDS = ("consumer", "header", "query")
_ATTRIBUTE_SOURCES = ("header", "query")
_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?$")

# The event's own data fields (Kong's, and the agent's latency_ms): an attribute must not overwrite one.
EVENT_FIELDS = frozenset({
    "request_method", "request_uri", "request_host", "client_ip", "request_user_agent", "request_size_bytes",
    "response_http_status", "response_size_bytes", "upstream_status", "route_id", "route_name", "service_id",
    "service_name", "service_port", "service_protocol", "subject_type", "latency_ms"})


def read_entry(entry: PluginEntry) -> MeteringEntry:
    """One entry's config, checked field by field; GatewayConfigError names the first thing refused."""
    where = entry.where
    config = entry.config
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise GatewayConfigError(f"{where}: config is not a mapping")
    for name in config:
        if name not in _KNOWN:
            raise GatewayConfigError(f"{where}: config.{shown_name(name)} is not a {NAME} setting")
    settings = {current: _one_of(config, current, old, where) for current, old in _RENAMED.items()}
    for name in _IGNORED_BOOLS:
        _typed(settings.get(name) if name in settings else config.get(name), bool, f"config.{name}", where)
    for name in _IGNORED_NUMBERS:
        _number(config.get(name), f"config.{name}", where)
    _queue(config.get("queue"), where)
    endpoint = _typed(settings["ingest_endpoint"], str, "config.ingest_endpoint", where)
    token = _typed(settings["api_token"], str, "config.api_token", where)
    meter = _typed(settings["meter_api_requests"], bool, "config.meter_api_requests", where)
    return MeteringEntry(
        where=where, scope=entry.scope,
        meter_api_requests=True if meter is None else meter,
        subject=_subject(config.get("subject"), where),
        attributes=_attributes(config.get("attributes"), where),
        allow_status_codes=_status_codes(config.get("allow_status_codes"), where),
        ingest_endpoint=endpoint or None,
        api_token=Secret(token) if token else None,
    )


def _one_of(config: dict, current: str, old: str, where: str) -> object:
    if config.get(current) is not None and config.get(old) is not None:
        raise GatewayConfigError(f"{where}: config gives both {current} and its older spelling {old}")
    return config.get(current) if config.get(current) is not None else config.get(old)


def _typed(value: object, kind: type, what: str, where: str) -> object:
    if value is not None and not isinstance(value, kind):
        label = "true or false" if kind is bool else "a string"
        raise GatewayConfigError(f"{where}: {what} is not {label}")
    return value


def _number(value: object, what: str, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise GatewayConfigError(f"{where}: {what} is not a number")


def _queue(queue: object, where: str) -> None:
    if queue is None:
        return
    if not isinstance(queue, dict):
        raise GatewayConfigError(f"{where}: config.queue is not a mapping")
    for name, value in queue.items():
        if name not in _QUEUE_FIELDS:
            raise GatewayConfigError(f"{where}: config.queue.{shown_name(name)} is not a {NAME} queue setting")
        _number(value, f"config.queue.{name}", where)


def _subject(subject: object, where: str) -> Subject:
    if subject is None:
        return Subject()
    if not isinstance(subject, dict):
        raise GatewayConfigError(f"{where}: config.subject is not a mapping")
    for name in subject:
        if name not in ("look_up_value_in", "in", "field"):
            raise GatewayConfigError(f"{where}: config.subject.{shown_name(name)} is not a subject setting")
    if subject.get("look_up_value_in") is not None and subject.get("in") is not None:
        raise GatewayConfigError(f"{where}: config.subject gives both look_up_value_in and its older spelling in")
    kind = subject.get("look_up_value_in") if subject.get("look_up_value_in") is not None else subject.get("in")
    kind = "consumer" if kind is None else kind
    if kind == "application":
        raise GatewayConfigError(f"{where}: config.subject.look_up_value_in application is not supported: the agent"
                                 " cannot see Dev Portal applications (use consumer, header or query)")
    if kind not in _SUBJECT_KINDS:
        raise GatewayConfigError(f"{where}: config.subject.look_up_value_in is not consumer, header or query")
    field = _typed(subject.get("field"), str, "config.subject.field", where)
    if kind == "consumer":
        return Subject()
    if not field:
        raise GatewayConfigError(f"{where}: config.subject.field is required with look_up_value_in {kind}")
    return Subject(kind, field.lower() if kind == "header" else field)


def _attributes(attributes: object, where: str) -> tuple[Attribute, ...]:
    if attributes is None:
        return ()
    if not isinstance(attributes, list):
        raise GatewayConfigError(f"{where}: config.attributes is not a list")
    read = []
    for index, attribute in enumerate(attributes):
        path = f"config.attributes[{index}]"
        if not isinstance(attribute, dict):
            raise GatewayConfigError(f"{where}: {path} is not a mapping")
        current = {"source", "look_up_value_in", "event_property_name"}
        old = {"in", "field", "key"}
        names = set(attribute)
        if not names <= current | old:
            unknown = sorted(names - current - old)[0]
            raise GatewayConfigError(f"{where}: {path}.{shown_name(unknown)} is not an attribute setting")
        if names & current and names & old:
            raise GatewayConfigError(f"{where}: {path} mixes the current spelling (source, look_up_value_in,"
                                     " event_property_name) with the older one (in, field, key)")
        source_key, name_key, property_key = (("in", "field", "key") if names & old
                                              else ("source", "look_up_value_in", "event_property_name"))
        source = attribute.get(source_key)
        if source not in _ATTRIBUTE_SOURCES:
            raise GatewayConfigError(f"{where}: {path}.{source_key} is not header or query")
        name = attribute.get(name_key)
        prop = attribute.get(property_key)
        for value, key in ((name, name_key), (prop, property_key)):
            if not isinstance(value, str) or not value:
                raise GatewayConfigError(f"{where}: {path}.{key} is not a non-empty string")
        if prop in EVENT_FIELDS:
            raise GatewayConfigError(f"{where}: {path}.{property_key} names one of the event's own data fields")
        read.append(Attribute(source, name.lower() if source == "header" else name, prop))
    return tuple(read)


def _status_codes(codes: object, where: str) -> tuple[tuple[int, int], ...] | None:
    """`["200-299", "404"]` -> ((200, 299), (404, 404)); None for every status (no list, or an empty one,
    as in Kong's other plugins with this field)."""
    if codes is None or codes == []:
        return None
    if not isinstance(codes, list):
        raise GatewayConfigError(f"{where}: config.allow_status_codes is not a list")
    ranges = []
    for index, code in enumerate(codes):
        match = _STATUS_RANGE.match(str(code)) if isinstance(code, (str, int)) and not isinstance(code, bool) else None
        low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
        if not match or not 100 <= low <= high <= 599:
            raise GatewayConfigError(f"{where}: config.allow_status_codes[{index}] is not a status code or a range"
                                     " such as 200-299")
        ranges.append((low, high))
    return tuple(ranges)


