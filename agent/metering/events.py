"""The CloudEvent for one billed exchange, with the fields and names of Kong's Metering & Billing plugin."""

from __future__ import annotations

import functools
import hashlib
import socket
import uuid
from datetime import datetime, timezone

from cloudevents.core.v1.event import CloudEvent

from agent.http.exchanges import Exchange
from agent.metering.key_lookup import hide_credentials

EVENT_TYPE = "kong.api_request"


def event_id(exchange: Exchange) -> str:
    """Deterministic and unique per request: the connection and the sequence number of the request's first byte.

    Replaying a capture, or capturing the same traffic live, gives the same id, so the ingest side's
    de-duplication on (source, id) counts a re-sent event once. The id is a name-based UUID of version 8
    (RFC 9562: SHA-256 of the name, version and RFC 4122 variant bits set), valid for a strict ingest side;
    the Rust core computes the same.
    """
    connection, request = exchange.connection, exchange.request
    assert request is not None and connection.to_server.base_seq is not None
    first_byte = (connection.to_server.base_seq + request.position) & 0xFFFFFFFF  # as on the wire
    prefix = _connection_identity(connection.client, connection.client_port, connection.server, connection.server_port)
    digest = bytearray(hashlib.sha256(b"%s/%d" % (prefix, first_byte)).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return str(uuid.UUID(bytes=bytes(digest)))


@functools.lru_cache(maxsize=4096)
def _connection_identity(client: bytes, client_port: int, server: bytes, server_port: int) -> bytes:
    return f"{client.hex()}:{client_port}>{server.hex()}:{server_port}".encode()


@functools.lru_cache(maxsize=65536)
def ip_text(address: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(address) == 4 else socket.AF_INET6, address)


def request_host(exchange: Exchange) -> str:
    """Like Kong's `request_host` (nginx's $host): from an absolute URI or the Host header, lower case, no port."""
    request = exchange.request
    assert request is not None
    target = request.target
    if "://" in target:
        return _bare_host(target.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2])
    return _bare_host(request.header("host") or ip_text(exchange.connection.server))


@functools.lru_cache(maxsize=4096)
def _bare_host(host: str) -> str:
    if host.startswith("["):
        return host.partition("]")[0].lstrip("[").lower()
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


@functools.lru_cache(maxsize=4)
def _rfc3339_second(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(timestamp: float) -> str:
    """RFC 3339 in UTC with microseconds; events come in bursts within one second, so that part is cached."""
    second = int(timestamp // 1)
    microseconds = min(round((timestamp - second) * 1_000_000), 999_999)
    return f"{_rfc3339_second(second)}.{microseconds:06d}Z"


def build_event(exchange: Exchange, subject: str, subject_type: str, source: str, key_names: tuple[str, ...],
                key: str | None = None) -> dict:
    """A structured-mode CloudEvent dict: the SDK's CloudEvent validates the attributes, and its attributes
    and data are what is returned, with `time` in its RFC 3339 wire form."""
    request = exchange.request
    assert request is not None
    # capture clocks can step back (NTP): a latency is never negative
    latency = max(0, round((exchange.response_end - request.start_time) * 1000)) if exchange.status else None
    response = exchange.response
    answered_by_kong = response is not None and response.header("x-kong-response-latency") is not None
    data = {
        "request_method": request.method,
        "request_uri": hide_credentials(request.target, key_names, key),
        "request_host": request_host(exchange),
        "client_ip": ip_text(exchange.connection.client),
        "request_user_agent": request.header("user-agent"),
        "request_size_bytes": request.size,
        "response_http_status": exchange.status,
        "response_size_bytes": exchange.response_size,
        "upstream_status": str(exchange.status) if exchange.status and not answered_by_kong else None,  # as nginx's
        # Kong knows which route and service matched; the wire does not say
        "route_id": None, "route_name": None, "service_id": None, "service_name": None, "service_port": None,
        "service_protocol": None,
        "subject_type": subject_type,
        "latency_ms": latency,
    }
    event = CloudEvent(
        {
            "id": event_id(exchange),
            "source": source,
            "type": EVENT_TYPE,
            "subject": subject,
            "time": datetime.fromtimestamp(request.start_time, timezone.utc),
            "datacontenttype": "application/json",
        },
        data,
    )
    structured = dict(event.get_attributes())
    structured["time"] = rfc3339(request.start_time)  # the SDK keeps a datetime; sinks want the wire form
    structured["data"] = event.get_data()
    return structured
