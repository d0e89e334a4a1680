"""A test double of OpenMeter's event ingest, as ../shared/contracts/openmeter-ingest.openapi.yaml describes it.

A real HTTP/1.1 server (keep-alive) on 127.0.0.1:
- `POST /api/v1/events` answers 204 (OpenMeter), `POST /v3/openmeter/events` 202 (Konnect).
- Content types as OpenMeter's handler: `application/cloudevents+json` (one event),
  `application/cloudevents-batch+json` (an array), `application/json` (either); anything else is 400.
- `Authorization: Bearer <token>` when a token is set: missing or wrong gives 401.
- Every event is checked against the spec's `Event` schema (required non-empty strings, `data` an object,
  `time` RFC 3339, `datacontenttype` application/json); one invalid event refuses the whole request with 400.
- Errors are `application/problem+json` with `type`, `title`, `status`, `detail`, `instance`.
- Accepted events are recorded by (source, id), re-sends included, so a test can tell loss from duplication.

Failure injection (`inject(Fault(...))`), applied before anything else, first active fault wins:
`status` (e.g. 503, 429 with Retry-After), `reset` (TCP RST, no answer), `delay` (a slow answer, then the
normal one), `ack_lost` (events accepted and recorded, then RST instead of the answer).

Run as a script (`python tests/doubles/ingest.py --unavailable-for 3 --reset-for 2`) it serves until killed,
printing its base URL; `GET /_double/summary` and `GET /_double/accepted` report what it received.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

V1_PATH = "/api/v1/events"
V3_PATH = "/v3/openmeter/events"
SUCCESS = {V1_PATH: 204, V3_PATH: 202}
CONTENT_TYPES = ("application/cloudevents+json", "application/cloudevents-batch+json", "application/json")
REQUIRED = ("id", "source", "specversion", "type", "subject")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 412: "Precondition Failed",
          429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
Key = tuple[str, str]


@dataclass
class Fault:
    kind: str  # "status" | "reset" | "delay" | "ack_lost"
    status: int = 503
    retry_after: str | None = None
    delay: float = 0.0
    times: int | None = 1  # how many requests it applies to (None: every request until `until`)
    until: float | None = None  # time.monotonic() after which it no longer applies


@dataclass
class Received:
    """One request as the double saw it (what a test asserts about the agent's requests)."""

    path: str
    content_type: str
    authorization: str | None
    body: bytes
    status: int  # 0 when answered with a reset
    events: int
    at: float
    peer: tuple[str, int] = ("", 0)  # the client's address: one port across requests = a reused connection


def event_problem(event: Any) -> str | None:
    """Why an event does not match the spec's Event schema, or None."""
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    for name in REQUIRED:
        if not isinstance(event.get(name), str) or not event[name]:
            return f"{name}: required, a non-empty string"
    if event.get("data") is not None and not isinstance(event["data"], dict):
        return "data: must be a JSON object"
    when = event.get("time")
    if when is not None and not (isinstance(when, str) and RFC3339.fullmatch(when) and _valid_time(when)):
        return "time: must be an RFC 3339 date-time"
    if event.get("datacontenttype") not in (None, "application/json"):
        return "datacontenttype: only application/json is allowed"
    return None


def kong_events(first: int, count: int, source: str = "kong-metering-agent/test") -> list[dict]:
    """Events shaped like the agent's (Kong's `kong.api_request`), with deterministic ids."""
    subjects = ("alice", "bob", "carol")
    return [{
        "specversion": "1.0", "id": f"evt-{i:09d}", "source": source, "type": "kong.api_request",
        "subject": subjects[i % 3], "time": f"2024-05-01T10:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        "datacontenttype": "application/json",
        "data": {"request_method": "GET", "request_uri": f"/orders?page={i}", "request_host": "api.example.com",
                 "client_ip": "127.0.0.1", "request_user_agent": "curl/8.5.0", "request_size_bytes": 187,
                 "response_http_status": 200, "response_size_bytes": 312, "upstream_status": "200",
                 "route_id": "0f5a2c3e-1b7d-4e0a-9c59-0d9e6f1a2b3c", "route_name": "orders",
                 "service_id": "5b1e7a9d-3c2f-4d8e-a6b4-7c9d0e1f2a3b", "service_name": "orders",
                 "service_port": 8080, "service_protocol": "http", "subject_type": "consumer"},
    } for i in range(first, first + count)]


def json_lines(events: list[dict]) -> bytes:
    """Events the way the pipeline hands them to a sink: one compact JSON object per line."""
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


def _valid_time(when: str) -> bool:
    try:
        datetime.fromisoformat(when.replace("z", "Z"))
    except ValueError:
        return False
    return True


class IngestDouble:
    def __init__(self, token: str | None = "test-token", *, reject_ids: set[str] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.reject_ids = set(reject_ids or ())
        self.accepted: list[Key] = []
        self.received: list[Received] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._instances = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="ingest-double",
                                        daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host}:{port}"

    @property
    def url(self) -> str:
        """OpenMeter's ingest URL (204)."""
        return self.base_url + V1_PATH

    @property
    def konnect_url(self) -> str:
        """Konnect's ingest URL (202)."""
        return self.base_url + V3_PATH

    def start(self) -> IngestDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> IngestDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control and inspection -----------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def accepted_counts(self) -> Counter[Key]:
        with self._lock:
            return Counter(self.accepted)

    def statuses(self) -> list[int]:
        with self._lock:
            return [request.status for request in self.received]

    def _take_fault(self) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if (f.times is None or f.times > 0)
                            and (f.until is None or now < f.until)]
            if not self._faults:
                return None
            fault = self._faults[0]
            if fault.times is not None:
                fault.times -= 1
            return fault

    def _record(self, request: Received, keys: list[Key]) -> None:
        with self._lock:
            self.received.append(request)
            self.accepted.extend(keys)

    # -- the operation ----------------------------------------------------------------------------------

    def answer(self, path: str, headers: Any, body: bytes) -> tuple[int, dict | None, list[Key], dict[str, str]]:
        """(status, problem or None, accepted keys, extra headers) for one POST, per the contract."""
        if path not in SUCCESS:
            return 404, self._problem(404, "no such operation"), [], {}
        if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, self._problem(401, "missing or invalid Bearer token"), [], {}
        content_type = headers.get("Content-Type", "")
        if content_type not in CONTENT_TYPES:
            return 400, self._problem(400, f"invalid content type: {content_type}"), [], {}
        try:
            document = json.loads(body)
        except ValueError as exc:
            return 400, self._problem(400, f"request body is not JSON: {exc}"), [], {}
        if content_type == "application/cloudevents+json" and not isinstance(document, dict):
            return 400, self._problem(400, "expected one event (a JSON object)"), [], {}
        if content_type == "application/cloudevents-batch+json" and not isinstance(document, list):
            return 400, self._problem(400, "expected a batch of events (a JSON array)"), [], {}
        events = document if isinstance(document, list) else [document]
        if not events:
            return 400, self._problem(400, "no events found"), [], {}
        for index, event in enumerate(events):
            problem = event_problem(event)
            if problem is None and event["id"] in self.reject_ids:
                problem = "event refused by the test"
            if problem:
                event_id = event.get("id") if isinstance(event, dict) else None
                return 400, self._problem(400, f"event {index} (id {event_id!r}): {problem}"), [], {}
        return SUCCESS[path], None, [(event["source"], event["id"]) for event in events], {}

    def _problem(self, status: int, detail: str) -> dict:
        return {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status,
                "detail": detail, "instance": f"urn:request:local/ingest-double-{next(self._instances):06d}"}


def _handler_for(double: IngestDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # as Go's net/http (OpenMeter) does: no Nagle delay between an answer's headers and body
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `received` instead
            pass

        def do_GET(self) -> None:
            if self.path == "/_double/summary":
                counts = double.accepted_counts()
                self._send(200, {"accepted": sum(counts.values()), "unique": len(counts),
                                 "requests": len(double.received), "statuses": Counter(double.statuses())})
            elif self.path == "/_double/accepted":
                self._send(200, sorted(double.accepted_counts()))
            else:
                self._send(404, double._problem(404, "no such resource"), "application/problem+json")

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length")
            body = self.rfile.read(int(length)) if length and length.isdigit() else b""
            received = Received(self.path, self.headers.get("Content-Type", ""), self.headers.get("Authorization"),
                                body, 0, 0, time.monotonic(), self.client_address[:2])
            fault = double._take_fault()
            if fault is not None and fault.kind == "reset":
                double._record(received, [])
                return self._reset()
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay)
            if fault is not None and fault.kind == "status":
                received.status = fault.status
                double._record(received, [])
                extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return self._send(fault.status, double._problem(fault.status, "injected failure"),
                                  "application/problem+json", extra)
            status, problem, keys, extra = double.answer(self.path, self.headers, body)
            received.events = len(keys)
            if fault is not None and fault.kind == "ack_lost":
                double._record(received, keys)
                return self._reset()
            received.status = status
            double._record(received, keys)
            if problem is None:
                return self._send(status, None)
            self._send(status, problem, "application/problem+json", extra)

        def _send(self, status: int, document: Any, content_type: str = "application/json",
                  extra: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                if status == 204:
                    self.end_headers()
                    return
                payload = b"" if document is None else json.dumps(document).encode()
                if payload:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up (timeout): its problem, not the double's
                self.close_connection = True

        def _reset(self) -> None:
            """Abort the connection with a TCP RST, as a crashing proxy or a dropped link would."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the ingest double until killed.")
    parser.add_argument("--token", default=None, help="require this Bearer token (default: no auth)")
    parser.add_argument("--unavailable-for", type=float, default=0.0, metavar="SECONDS",
                        help="answer 503 for this long from start")
    parser.add_argument("--reset-for", type=float, default=0.0, metavar="SECONDS",
                        help="then reset connections for this long")
    args = parser.parse_args(argv)
    double = IngestDouble(args.token)
    start = time.monotonic()
    if args.unavailable_for:
        double.inject(Fault("status", 503, times=None, until=start + args.unavailable_for))
    if args.reset_for:
        double.inject(Fault("reset", times=None, until=start + args.unavailable_for + args.reset_for))
    double.start()
    print(double.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
