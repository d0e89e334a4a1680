"""Record the real-traffic capture fixtures: real clients -> nginx as Kong with key-auth -> tcpdump.

Each fixture is one traffic theme against a fresh stand-in gateway (see kong_standin.py), captured with
tcpdump on loopback. The truth comes from nginx's JSON access log; before a truth file is written the
recorder checks the log against the capture itself: every request nginx logged is found on the wire
(same connection, order, method and target), its request/response byte counts equal the bytes on the
wire, nginx's consumer equals what Kong's key-auth rules give for the request as sent, and tshark counts
the same number of HTTP requests. Any mismatch fails the run.

    python scripts/record_fixtures.py [--out captures] [--port 8000] [--only nginx-basic ...]

Needs root (tcpdump), nginx, tcpdump, tshark/editcap, curl.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dpkt
import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kong_standin import DEFAULT_DECK_FILE, KongStandin, StandinError, load_consumers, strip_key_params  # noqa: E402

MADE_BY = "scripts/record_fixtures.py"
KEY_NAME = "apikey"
CLIENT_TIMEOUT = 20.0
SETTLE_SECONDS = 1.5  # let tcpdump drain its ring before it is stopped
RING_KIB = 65536  # whole loopback frames are up to 64 KiB: a small ring drops bursts of them


class RecordError(RuntimeError):
    """The recording or one of its self-checks failed."""


# ---------------------------------------------------------------------------------------------------
# Keys from the decK file, by consumer subject


def _keys_by_subject(deck_file: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for key, (subject, _) in load_consumers(deck_file).items():
        keys.setdefault(subject, []).append(key)
    return keys


KEYS = _keys_by_subject(DEFAULT_DECK_FILE)
ALICE = KEYS["alice"][0]
BOB = KEYS["bob"][0]
CAROL_OLD, CAROL_NEW = KEYS["carol"]
MACHINE = next(keys[0] for subject, keys in KEYS.items() if subject not in ("alice", "bob", "carol"))
UNKNOWN = "not-a-known-key-000"


# ---------------------------------------------------------------------------------------------------
# Clients


@dataclass
class Traffic:
    """What a scenario sends; counts requests so the recorder knows how many log lines to wait for."""

    port: int
    workdir: Path
    sent: int = 0

    def url(self, target: str, host: str = "127.0.0.1") -> str:
        authority = f"[{host}]" if ":" in host else host
        return f"http://{authority}:{self.port}{target}"

    def curl(self, *args: str, requests: int = 1) -> str:
        """Run curl (one process, one connection unless it is given several URLs); returns its stdout."""
        command = ["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 5)
        if result.returncode != 0:
            raise RecordError(f"curl failed ({result.returncode}): {result.stderr.strip()}")
        self.sent += requests
        return result.stdout

    def fetch(self, *args: str) -> None:
        """One curl request whose response body is not needed."""
        self.curl("-o", "/dev/null", *args)

    def raw(self, payload: bytes, requests: int, host: str = "127.0.0.1") -> None:
        """Send all requests in one write and read the responses after; the last must close the connection."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(CLIENT_TIMEOUT)
            conn.connect((host, self.port))
            conn.sendall(payload)
            deadline = time.monotonic() + CLIENT_TIMEOUT
            while time.monotonic() < deadline and conn.recv(65536):
                pass
        self.sent += requests

    def body_file(self, name: str, size: int, seed: int) -> str:
        """A deterministic incompressible upload body, as a curl @file argument."""
        path = self.workdir / name
        path.write_bytes(random.Random(seed).randbytes(size))
        return f"@{path}"


def _request(method: str, target: str, headers: dict[str, str], body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}"] + [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(body: bytes, chunk_size: int) -> bytes:
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


# ---------------------------------------------------------------------------------------------------
# Scenarios: each sends one theme of traffic, one client after another (so request order is unambiguous)


def scenario_basic(t: Traffic) -> None:
    """curl, one connection per request unless noted: key placement, 401s, methods and status codes."""
    key = f"{KEY_NAME}: {ALICE}"
    t.fetch(t.url(f"/orders?page=2&{KEY_NAME}={ALICE}&sort=asc"))
    t.fetch("-H", f"{KEY_NAME}: {BOB}", t.url("/orders/17"))
    t.fetch(t.url(f"/invoices?{KEY_NAME}={MACHINE}"))
    t.fetch("-H", f"ApiKey: {CAROL_OLD}", t.url("/orders?status=open"))
    t.fetch(t.url("/orders"))
    t.fetch("-H", f"{KEY_NAME}: {UNKNOWN}", t.url("/orders"))
    t.fetch(t.url(f"/orders?status=open&{KEY_NAME}={UNKNOWN}"))
    t.fetch("-H", f"{KEY_NAME}: {BOB}", t.url(f"/orders?{KEY_NAME}={ALICE}"))  # the header wins
    t.fetch("-H", f"{KEY_NAME}: {UNKNOWN}", t.url(f"/orders?{KEY_NAME}={ALICE}"))  # even when unknown
    t.curl("-I", "-H", key, t.url("/static/catalog.json"))
    headers = t.curl("-D", "-", "-o", "/dev/null", "-H", key, t.url("/static/catalog.json"))
    etag = next(line.split(":", 1)[1].strip() for line in headers.splitlines() if line.lower().startswith("etag:"))
    t.fetch("-H", key, "-H", f"If-None-Match: {etag}", t.url("/static/catalog.json"))
    t.fetch("-X", "DELETE", "-H", f"{KEY_NAME}: {CAROL_NEW}", t.url("/orders/17"))
    t.fetch("-H", key, "-H", "Content-Type: application/json", "--data-binary", '{"sku":"SKU-0007","qty":3}',
            t.url("/orders"))
    for code in (404, 429, 500):
        t.fetch("-H", f"{KEY_NAME}: {BOB}", t.url(f"/status/{code}"))
    t.fetch("--compressed", "-H", key, t.url("/reports/export"))
    t.fetch("-H", f"{KEY_NAME}: {MACHINE}", t.url("/stream"))
    t.curl("-o", "/dev/null", "-o", "/dev/null", t.url(f"/orders?{KEY_NAME}={CAROL_NEW}"),
           t.url(f"/orders/18?{KEY_NAME}={CAROL_NEW}&expand=items"), requests=2)


def scenario_keepalive(t: Traffic) -> None:
    """One httpx connection, a different key (or none) on every request."""
    plan: list[tuple[str, str, dict[str, str], dict[str, str], bytes | None]] = [
        ("GET", "/orders", {KEY_NAME: ALICE}, {}, None),
        ("GET", "/orders", {}, {"page": "3", KEY_NAME: BOB, "sort": "asc"}, None),
        ("GET", "/orders/42", {"APIKEY": CAROL_OLD}, {}, None),
        ("GET", "/customers", {}, {KEY_NAME: CAROL_NEW}, None),
        ("POST", "/orders", {KEY_NAME: MACHINE, "content-type": "application/json"}, {}, b'{"sku":"SKU-0001"}'),
        ("GET", "/orders", {}, {}, None),
        ("GET", "/orders", {KEY_NAME: UNKNOWN}, {}, None),
        ("GET", "/reports/export", {KEY_NAME: BOB}, {}, None),
        ("HEAD", "/static/catalog.json", {KEY_NAME: ALICE}, {}, None),
        ("DELETE", "/orders/42", {KEY_NAME: CAROL_NEW}, {}, None),
        ("GET", "/status/500", {}, {"trace": "1", KEY_NAME: MACHINE}, None),
        ("PUT", "/orders/42", {KEY_NAME: BOB}, {}, b'{"qty":5}' * 200),
        ("GET", "/stream", {KEY_NAME: ALICE}, {}, None),
    ]
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=t.url(""), limits=limits, timeout=CLIENT_TIMEOUT) as client:
        for method, path, headers, params, body in plan:
            client.request(method, path, headers=headers, params=params, content=body).read()
            t.sent += 1


def scenario_pipelining(t: Traffic) -> None:
    """Raw sockets, several requests in one write, responses read after; chunked both ways."""
    host = f"127.0.0.1:{t.port}"
    first = [
        _request("GET", "/orders", {"Host": host, KEY_NAME: ALICE}),
        _request("GET", f"/orders?page=1&{KEY_NAME}={BOB}&sort=desc", {"Host": host}),
        _request("HEAD", "/static/catalog.json", {"Host": host, KEY_NAME: CAROL_OLD}),
        _request("POST", "/orders", {"Host": host, KEY_NAME: MACHINE, "Content-Type": "application/json",
                                     "Content-Length": "27"}, b'{"sku":"SKU-0009","qty":12}'),
        _request("GET", "/orders", {"Host": host}),
        _request("GET", "/orders/9", {"Host": host, KEY_NAME: ALICE, "Connection": "close"}),
    ]
    t.raw(b"".join(first), requests=len(first))
    upload = random.Random(7).randbytes(3000)
    second = [
        _request("GET", "/reports/export", {"Host": host, KEY_NAME: BOB, "Accept-Encoding": "gzip"}),
        _request("POST", f"/uploads?{KEY_NAME}={CAROL_NEW}", {"Host": host, "Transfer-Encoding": "chunked"},
                 _chunked(upload, 1024)),
        _request("GET", "/stream", {"Host": host, KEY_NAME: ALICE}),
        _request("DELETE", "/orders/9", {"Host": host, KEY_NAME: UNKNOWN}),
        _request("GET", "/status/404", {"Host": host, KEY_NAME: MACHINE, "Connection": "close"}),
    ]
    t.raw(b"".join(second), requests=len(second))


def scenario_uploads(t: Traffic) -> None:
    """Request bodies: large, chunked, Expect: 100-continue, and uploads rejected by key-auth."""
    url = t.url
    t.fetch("-H", "Expect:", "-H", f"{KEY_NAME}: {ALICE}", "--data-binary",
            t.body_file("large.bin", 3 * 1024 * 1024, 1), url("/uploads"))
    t.fetch("-X", "PUT", "-H", "Expect:", "-H", "Transfer-Encoding: chunked", "--data-binary",
            t.body_file("chunked.bin", 256 * 1024, 2), url(f"/uploads/2?kind=raw&{KEY_NAME}={BOB}"))
    t.fetch("-H", "Expect: 100-continue", "-H", f"{KEY_NAME}: {CAROL_OLD}", "--data-binary",
            t.body_file("expect.bin", 512 * 1024, 3), url("/uploads/3"))
    t.fetch("-H", "Expect: 100-continue", "-H", "Transfer-Encoding: chunked", "-H", f"{KEY_NAME}: {MACHINE}",
            "--data-binary", t.body_file("expect-chunked.bin", 128 * 1024, 4), url("/uploads/4"))
    t.fetch("-H", "Expect:", "-H", f"{KEY_NAME}: {UNKNOWN}", "--data-binary",
            t.body_file("rejected.bin", 64 * 1024, 5), url("/uploads/5"))
    t.fetch("-H", "Expect: 100-continue", "--data-binary", t.body_file("never-sent.bin", 256 * 1024, 6),
            url("/uploads/6"))


def scenario_ipv6(t: Traffic) -> None:
    """The same gateway over [::1]: curl -g, an httpx keep-alive connection, a pipelined pair."""
    v6 = "::1"
    t.fetch("-g", t.url(f"/orders?{KEY_NAME}={ALICE}&page=1", v6))
    t.fetch("-g", "-H", f"{KEY_NAME}: {BOB}", t.url("/orders/5", v6))
    t.fetch("-g", t.url("/orders", v6))
    t.fetch("-g", "-H", f"{KEY_NAME}: {MACHINE}", "--data-binary", '{"sku":"SKU-0003"}', t.url("/orders", v6))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=t.url("", v6), limits=limits, timeout=CLIENT_TIMEOUT) as client:
        for headers, params in (({KEY_NAME: CAROL_OLD}, {}), ({}, {KEY_NAME: CAROL_NEW, "q": "x"}),
                                ({KEY_NAME: UNKNOWN}, {})):
            client.get("/customers", headers=headers, params=params).read()
            t.sent += 1
    host = f"[::1]:{t.port}"
    pair = [
        _request("GET", "/orders", {"Host": host, KEY_NAME: ALICE}),
        _request("GET", "/status/429", {"Host": host, KEY_NAME: BOB, "Connection": "close"}),
    ]
    t.raw(b"".join(pair), requests=len(pair), host=v6)


def scenario_http10(t: Traffic) -> None:
    """HTTP/1.0: connection closed after each response unless keep-alive is asked; close-delimited bodies."""
    key = f"{KEY_NAME}: {ALICE}"
    t.fetch("--http1.0", t.url(f"/orders?page=3&{KEY_NAME}={ALICE}"))
    t.curl("--http1.0", "-H", "Connection: keep-alive", "-H", f"{KEY_NAME}: {BOB}", "-o", "/dev/null",
           "-o", "/dev/null", t.url("/orders/1"), t.url("/orders/2"), requests=2)
    t.fetch("--http1.0", "--compressed", "-H", key, t.url("/reports/export"))
    t.fetch("--http1.0", "-H", f"{KEY_NAME}: {MACHINE}", t.url("/stream"))
    t.fetch("--http1.0", t.url("/orders"))
    t.fetch("--http1.0", "-H", f"{KEY_NAME}: {CAROL_OLD}", "--data-binary", '{"sku":"SKU-0004"}',
            t.url("/orders"))
    t.curl("--http1.0", "-I", "-H", key, t.url("/static/catalog.json"))
    t.raw(_request("GET", f"/orders?{KEY_NAME}={CAROL_NEW}", {}, version="1.0"), requests=1)


TUTORIAL_DECK = DEFAULT_DECK_FILE.with_name("kong-tutorial.yaml")
TUTORIAL_ALICE, TUTORIAL_BOB = "alice-key", "bob-key-41d2e8"


def scenario_routes(t: Traffic) -> None:
    """Kong's metering tutorial behind the stand-in's routes: the plugin's service (attributes, its status
    filter), a service without the plugin, a request no route matches, a 401, a route on its own host whose
    entry takes the subject from a header, and one connection crossing two routes."""
    alice, bob = f"{KEY_NAME}: {TUTORIAL_ALICE}", f"{KEY_NAME}: {TUTORIAL_BOB}"
    t.fetch("-H", alice, "-H", "X-Department: engineering", t.url("/anything?project=apollo"))
    t.fetch("-H", alice, t.url("/anything/deep/path"))
    t.fetch("-H", bob, "-H", "Content-Type: application/json", "--data-binary", '{"sku":"SKU-0001"}',
            t.url("/anything"))
    for code in (404, 500, 429):  # the plugin bills 200-299 and 404 only
        t.fetch("-H", alice, t.url(f"/status/{code}"))
    t.fetch("-H", alice, t.url("/orders/17"))  # orders has no plugin: not metered
    t.fetch("-H", bob, "-H", "X-Department: sales", t.url("/orders"))
    t.fetch("-H", alice, t.url("/nowhere"))  # no route: Kong's 404, before key-auth
    t.fetch(t.url("/anything"))  # no key: 401
    t.fetch("-H", bob, "-H", "Host: billing.example.com", "-H", "X-Tenant-Id: tenant-9", t.url("/invoices"))
    t.fetch("-H", alice, "-H", "Host: billing.example.com", t.url("/anything"))  # no tenant: no subject
    t.curl("-o", "/dev/null", "-o", "/dev/null", "-H", alice, "-H", "X-Department: research",
           t.url("/anything?project=zeus&page=2"), t.url("/orders/18"), requests=2)


def tutorial_entities() -> tuple[dict[str, dict], dict[str, dict]]:
    """Routes and services of the tutorial's decK file, by name, as the truth names them."""
    state = yaml.safe_load(TUTORIAL_DECK.read_text(encoding="utf-8"))
    routes, services = {}, {}
    for service in state["services"]:
        services[service["name"]] = service
        for route in service.get("routes") or []:
            routes[route["name"]] = {**route, "service": service["name"]}
    return routes, services


def tutorial_event(checked: Checked) -> dict | None:
    """What Kong's plugin sends for one request of the tutorial's setup, from nginx's log line: which
    location (route) answered, the consumer key-auth resolved, and the decK file's plugin entries, written
    out here as the file says them (no agent code)."""
    log = checked.log
    route_name, status = log["route_name"], log["status"]
    if not route_name or not log["consumer"] or status == 401:
        return None  # no route (Kong's 404, no plugin runs), or key-auth's rejection
    routes, services = tutorial_entities()
    route = routes[route_name]
    service = services[route["service"]]
    attributes: dict[str, str] = {}
    if route["service"] == "example-service":
        if not (200 <= status <= 299 or status == 404):
            return None  # allow_status_codes: ["200-299", "404"]
        subject = log["consumer"]
        if log["http_x_department"]:
            attributes["department"] = log["http_x_department"]
        query = log["request_uri"].partition("?")[2]
        project = next((v for n, _, v in (p.partition("=") for p in query.split("&")) if n == "project"), None)
        if project is not None:
            attributes["project"] = project
    elif route_name == "billing-route":
        subject = log["http_x_tenant_id"]  # subject.look_up_value_in header, field X-Tenant-Id
        if not subject:
            return None  # no subject: dropped, as Kong's plugin drops it
    else:
        return None  # a service without the plugin
    scheme, _, rest = service["url"].partition("://")
    port = rest.rpartition(":")[2] if ":" in rest else ("443" if scheme == "https" else "80")
    return {"subject": subject, "method": log["request_method"], "uri": strip_key_params(log["request_uri"]),
            "status": status, "request_size": log["request_length"], "response_size": log["bytes_sent"],
            "route_id": route["id"], "route_name": route_name, "service_id": service["id"],
            "service_name": service["name"], "service_port": int(port), "service_protocol": scheme,
            "attributes": attributes}


def tutorial_counters(checked: list[Checked]) -> dict[str, int]:
    logs = [c.log for c in checked]
    return {"rejected": sum(1 for log in logs if log["route_name"] and log["status"] == 401),
            "no_route": sum(1 for log in logs if not log["route_name"]),
            "out_of_scope": sum(1 for log in logs if log["route_name"] == "orders-route")}


def check_one_connection(checked: list[Checked]) -> None:
    if len({c.log["connection"] for c in checked}) != 1:
        raise RecordError("the client did not keep one connection")


def check_pipelined(checked: list[Checked]) -> None:
    """Each connection's requests must have left in one segment, or it is not pipelining."""
    first_frames: dict[tuple[str, int], set[int]] = {}
    for c in checked:
        first_frames.setdefault(c.wire.client, set()).add(c.wire.first_frame)
    if any(len(frames) != 1 for frames in first_frames.values()):
        raise RecordError("pipelined requests were split over several segments")


@dataclass(frozen=True)
class Fixture:
    name: str
    scenario: Callable[[Traffic], None]
    description: str
    variants: bool = False  # also write pcapng, gzip and `-i any` copies
    check: Callable[[list[Checked]], None] | None = None  # what the theme must really have put on the wire
    deck: Path = DEFAULT_DECK_FILE  # the gateway's configuration (the stand-in's keys, and routes if `routes`)
    routes: bool = False  # the stand-in routes as the decK file's routes say
    event: Callable[[Checked], dict | None] | None = None  # the truth's event for a request; None: not billed
    counters: Callable[[list[Checked]], dict[str, int]] | None = None


FIXTURES = [
    Fixture("nginx-basic", scenario_basic,
            "curl against nginx configured as Kong key-auth: key in the apikey header (any name case) or the "
            "query string (alone or among other parameters, the header winning over the query), missing and "
            "unknown keys (401), HEAD, DELETE 204, POST 201, ETag 304, 404/429/500, gzip-chunked and chunked "
            "responses, two requests on one curl connection.", variants=True),
    Fixture("nginx-keepalive", scenario_keepalive,
            "One HTTP/1.1 keep-alive connection (httpx) carrying 13 requests, each with a different key, key "
            "placement or none: 401s in the middle of the connection, bodies, HEAD, 204, 500, chunked responses.",
            check=check_one_connection),
    Fixture("nginx-pipelining", scenario_pipelining,
            "Raw-socket HTTP/1.1 pipelining: two connections, each sending all its requests in one write before "
            "reading; includes HEAD, a POST body, a chunked upload, chunked responses and 401s between billed "
            "requests.", check=check_pipelined),
    Fixture("nginx-uploads", scenario_uploads,
            "Request bodies: a 3 MiB upload, a chunked PUT (request_size includes the chunk framing), "
            "Expect: 100-continue uploads (response_size includes the 25-byte 'HTTP/1.1 100 Continue' interim "
            "response), a rejected 64 KiB upload that nginx answers 401 and discards, and a rejected "
            "Expect: 100-continue upload that nginx answers 100 Continue then 401, after which curl stops sending "
            "its body and closes (how much of the body left before that varies from run to run)."),
    Fixture("nginx-ipv6", scenario_ipv6,
            "The key-auth gateway over IPv6 loopback ([::1]): curl, an httpx keep-alive connection with "
            "per-request keys, and a pipelined pair."),
    Fixture("nginx-http10", scenario_http10,
            "HTTP/1.0 clients: one request per connection, a Connection: keep-alive pair, responses delimited "
            "by connection close (gzip and chunked upstream bodies re-sent without Content-Length), HEAD, a 401, "
            "and a request without a Host header."),
    Fixture("nginx-routes", scenario_routes,
            "Kong's metering tutorial (captures/kong-tutorial.yaml) behind nginx locations made from its routes: "
            "the plugin on example-service with attributes (header X-Department, query project) and "
            "allow_status_codes 200-299 and 404 (so 500 and 429 are not billed), orders without the plugin "
            "(not metered), a path no route matches (Kong's 404), a 401, billing-route on its own host with a "
            "route entry taking the subject from X-Tenant-Id (absent once: dropped), and one connection crossing "
            "two routes. Each event carries the route and service of the location that answered, with the "
            "decK file's ids.",
            deck=TUTORIAL_DECK, routes=True, event=tutorial_event, counters=tutorial_counters),
]


# ---------------------------------------------------------------------------------------------------
# tcpdump


@contextmanager
def capturing(targets: list[tuple[str, Path]], port: int) -> Iterator[None]:
    """Run one tcpdump per (interface, file); traffic starts only once each reports it is listening."""
    processes: list[subprocess.Popen[str]] = []
    reports: list[str] = []
    try:
        for interface, path in targets:
            command = ["tcpdump", "-i", interface, "-s", "0", "-B", str(RING_KIB), "-U", "--immediate-mode", "-n",
                       "-Z", "root", "-w", str(path), f"tcp port {port}"]
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
            processes.append(process)
            _wait_listening(process, interface)
        time.sleep(0.2)
        yield
        time.sleep(SETTLE_SECONDS)
    finally:
        reports = [_stop_tcpdump(process) for process in processes]
    for (interface, _), report in zip(targets, reports):
        dropped = [line for line in report.splitlines() if "dropped by kernel" in line]
        if not dropped or not dropped[0].startswith("0 "):
            raise RecordError(f"tcpdump on {interface} lost packets: {' / '.join(report.splitlines()[-3:])}")


def _stop_tcpdump(process: subprocess.Popen[str]) -> str:
    """Stop tcpdump the way a person would (it flushes and prints its counts); returns what it printed."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)
        return "tcpdump did not stop"


def _wait_listening(process: subprocess.Popen[str], interface: str) -> None:
    deadline = time.monotonic() + 10
    assert process.stderr is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.2)
        if ready:
            line = process.stderr.readline()
            if "listening on" in line:
                return
            if not line and process.poll() is not None:
                break
    raise RecordError(f"tcpdump on {interface} did not start listening")


# ---------------------------------------------------------------------------------------------------
# Reading the capture back: TCP streams, then HTTP messages as bytes on the wire


@dataclass
class Stream:
    """One direction of a TCP connection: its bytes and which capture frame carried each segment."""

    data: bytearray = field(default_factory=bytearray)
    starts: list[int] = field(default_factory=list)  # byte offset where each segment starts
    frames: list[int] = field(default_factory=list)  # capture frame index of that segment
    next_seq: int | None = None
    fin: bool = False

    def add(self, seq: int, payload: bytes, frame: int) -> None:
        if not payload:
            return
        if self.next_seq is None:
            raise RecordError("data before the SYN: the capture started too late")
        ahead = (seq - self.next_seq) % 2**32
        if ahead and ahead < 2**31:
            raise RecordError("a segment is missing from the capture")
        already = (self.next_seq - seq) % 2**32 if ahead else 0
        fresh = payload[already:]
        if fresh:
            self.starts.append(len(self.data))
            self.frames.append(frame)
            self.data += fresh
            self.next_seq = (self.next_seq + len(fresh)) % 2**32

    def frame_at(self, offset: int) -> int:
        return self.frames[bisect.bisect_right(self.starts, offset) - 1]


@dataclass
class Connection:
    client: tuple[str, int]
    upload: Stream = field(default_factory=Stream)
    download: Stream = field(default_factory=Stream)


def _open_capture(path: Path) -> tuple[IO[bytes], dpkt.pcap.Reader | dpkt.pcapng.Reader]:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    magic = raw.read(4)
    raw.seek(0)
    return raw, (dpkt.pcapng.Reader(raw) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(raw))


def _ip_layer(linktype: int, frame: bytes) -> dpkt.Packet:
    if linktype == dpkt.pcap.DLT_EN10MB:
        return dpkt.ethernet.Ethernet(frame).data
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return dpkt.sll.SLL(frame).data
    if linktype == dpkt.pcap.DLT_LINUX_SLL2:
        return dpkt.sll2.SLL2(frame).data
    raise RecordError(f"unexpected link type {linktype}")


def read_connections(path: Path, port: int) -> list[Connection]:
    """Reassemble every connection to `port`; fails on anything a clean loopback capture never has."""
    try:
        return _read_connections(path, port)
    except (dpkt.UnpackError, ValueError, EOFError) as error:
        raise RecordError(f"{path.name}: unreadable capture: {error!r}") from None


def _read_connections(path: Path, port: int) -> list[Connection]:
    raw, reader = _open_capture(path)
    connections: dict[tuple[str, int], Connection] = {}
    with raw:
        linktype = reader.datalink()
        for index, (_, frame) in enumerate(reader):
            ip = _ip_layer(linktype, frame)
            tcp = ip.data
            if not isinstance(tcp, dpkt.tcp.TCP):
                continue
            family = socket.AF_INET6 if isinstance(ip, dpkt.ip6.IP6) else socket.AF_INET
            to_server = tcp.dport == port
            client = (socket.inet_ntop(family, ip.src if to_server else ip.dst), tcp.sport if to_server else tcp.dport)
            if tcp.flags & dpkt.tcp.TH_SYN and not tcp.flags & dpkt.tcp.TH_ACK:
                connections[client] = Connection(client)
            conn = connections.get(client)
            if conn is None:
                raise RecordError(f"{path.name}: a connection without its SYN")
            stream = conn.upload if to_server else conn.download
            if tcp.flags & dpkt.tcp.TH_SYN:
                stream.next_seq = (tcp.seq + 1) % 2**32
                continue
            stream.add(tcp.seq, bytes(tcp.data), index)
            stream.fin = stream.fin or bool(tcp.flags & (dpkt.tcp.TH_FIN | dpkt.tcp.TH_RST))
    unfinished = [c.client for c in connections.values() if not (c.upload.fin and c.download.fin)]
    if unfinished:
        raise RecordError(f"{path.name}: connections not closed in the capture: {unfinished}")
    return list(connections.values())


@dataclass
class WireRequest:
    client: tuple[str, int]
    first_frame: int
    offset: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    request_size: int
    response_size: int = 0
    interim_responses: int = 0
    status: int = 0


def _head(data: bytes, start: int) -> tuple[str, list[tuple[str, str]], int]:
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise RecordError("an HTTP head without its end")
    first, *lines = data[start:end].decode("latin-1").split("\r\n")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    return first, headers, end + 4


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key == name), None)


def _chunked_end(data: bytes, pos: int) -> int:
    while True:
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            while True:  # trailers, then the empty line
                line_end = data.index(b"\r\n", pos)
                if line_end == pos:
                    return pos + 2
                pos = line_end + 2
        pos += size + 2


def _body_end(data: bytes, pos: int, headers: list[tuple[str, str]]) -> int | None:
    """Where a body ends; None when it runs to the end of the stream."""
    if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
        return _chunked_end(data, pos)
    length = _header(headers, "content-length")
    if length is not None:
        return min(pos + int(length), len(data))  # an Expect upload the client never sent stops short
    return None


def split_requests(conn: Connection) -> list[WireRequest]:
    """Cut both directions of a connection into requests and their responses, counting wire bytes."""
    try:
        return _split_requests(conn)
    except (ValueError, IndexError) as error:
        raise RecordError(f"{conn.client}: HTTP on the wire not understood: {error}") from None


def _split_requests(conn: Connection) -> list[WireRequest]:
    requests = []
    data, pos = bytes(conn.upload.data), 0
    while pos < len(data):
        first, headers, body_start = _head(data, pos)
        method, target, _ = first.split(" ", 2)
        end = _body_end(data, body_start, headers)
        end = body_start if end is None else end
        requests.append(WireRequest(conn.client, conn.upload.frame_at(pos), pos, method, target, headers, end - pos))
        pos = end
    data, pos = bytes(conn.download.data), 0
    for request in requests:
        while pos < len(data):
            first, headers, body_start = _head(data, pos)
            status = int(first.split(" ", 2)[1])
            if 100 <= status < 200:
                request.interim_responses += 1
                request.response_size += body_start - pos
                pos = body_start
                continue
            no_body = request.method == "HEAD" or status in (204, 304)
            end = body_start if no_body else _body_end(data, body_start, headers)
            end = len(data) if end is None else end
            request.status = status
            request.response_size += end - pos
            pos = end
            break
    if pos != len(data):
        raise RecordError(f"{conn.client}: {len(data) - pos} response bytes left over")
    return requests


def expected_subject(request: WireRequest, consumers: dict[str, tuple[str, str]]) -> str:
    """Kong's key-auth on the request as sent: the header first (any name case), then the query parameter."""
    key = _header(request.headers, KEY_NAME)
    if not key:
        _, _, query = request.target.partition("?")
        key = next((value for name, _, value in (p.partition("=") for p in query.split("&")) if name == KEY_NAME), "")
    return consumers.get(key, ("", ""))[0]


def tshark_request_count(path: Path, port: int) -> int:
    """An independent count of HTTP requests in the capture, by Wireshark's HTTP dissector.

    Wireshark's default misses a request whose body never fully arrives (rejected before it was sent), and
    without body reassembly it loses track after a body sent in segments of its own; per connection, the
    larger of the two counts is the right one.
    """
    per_mode = [_tshark_requests_per_stream(path, port, option) for option in ([], ["-o", "http.desegment_body:FALSE"])]
    streams = set().union(*per_mode)
    return sum(max(counts.get(stream, 0) for counts in per_mode) for stream in streams)


def _tshark_requests_per_stream(path: Path, port: int, options: list[str]) -> dict[str, int]:
    command = ["tshark", "-n", "-r", str(path), "-d", f"tcp.port=={port},http", *options, "-Y", "http.request",
               "-T", "fields", "-e", "tcp.stream", "-e", "http.request.method", "-E", "occurrence=a",
               "-E", "aggregator=,"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RecordError(f"tshark failed on {path.name}: {result.stderr.strip()}")
    counts: dict[str, int] = {}
    for line in result.stdout.splitlines():
        stream, _, methods = line.partition("\t")
        counts[stream] = counts.get(stream, 0) + len(methods.split(","))
    return counts


# ---------------------------------------------------------------------------------------------------
# Matching the access log with the wire, and the truth file


@dataclass
class Checked:
    """One request: nginx's log line and what the capture shows for it."""

    log: dict
    wire: WireRequest


def match_log_to_wire(entries: list[dict], capture: Path, port: int, consumers: dict) -> list[Checked]:
    """Pair each log line with its request on the wire and fail on any disagreement that matters."""
    wire: dict[tuple[str, int], list[WireRequest]] = {}
    for conn in read_connections(capture, port):
        wire[conn.client] = split_requests(conn)
    by_client: dict[tuple[str, int], list[dict]] = {}
    for entry in sorted(entries, key=lambda e: (e["connection"], e["connection_requests"])):
        by_client.setdefault((entry["remote_addr"], entry["remote_port"]), []).append(entry)
    if set(by_client) != set(wire):
        raise RecordError(f"{capture.name}: connections differ: log {sorted(by_client)} wire {sorted(wire)}")
    checked = []
    for client, logged in by_client.items():
        seen = wire[client]
        if len(logged) != len(seen):
            raise RecordError(f"{capture.name}: {client} has {len(logged)} log lines, {len(seen)} wire requests")
        for entry, request in zip(logged, seen):
            if (entry["request_method"], entry["request_uri"], entry["status"]) != (
                    request.method, request.target, request.status):
                raise RecordError(f"{capture.name}: log {_label(entry)} does not match the wire's "
                                  f"{request.method} {strip_key_params(request.target)} -> {request.status}")
            if entry["consumer"] != expected_subject(request, consumers):
                raise RecordError(f"{capture.name}: nginx resolved {_label(entry)} unlike Kong's key-auth")
            checked.append(Checked(entry, request))
    checked.sort(key=lambda c: (c.wire.first_frame, c.wire.offset))
    return checked


def _label(log: dict) -> str:
    """A request for messages, keys left out."""
    return f"{log['request_method']} {strip_key_params(log['request_uri'])} -> {log['status']}"


def size_findings(checked: list[Checked]) -> tuple[list[str], list[str]]:
    """Compare nginx's byte counts with the wire: (fatal mismatches, explained notes)."""
    fatal, notes = [], []
    for item in checked:
        log, wire = item.log, item.wire
        label = _label(log)
        if log["bytes_sent"] != wire.response_size:
            fatal.append(f"{label}: $bytes_sent {log['bytes_sent']} != wire {wire.response_size}")
        if log["request_length"] == wire.request_size:
            continue
        if log["status"] == 401 and log["request_length"] < wire.request_size:
            notes.append(f"{label}: $request_length {log['request_length']} counts only the part nginx read before "
                         f"answering; {wire.request_size} bytes were sent (body discarded after the 401)")
        else:
            fatal.append(f"{label}: $request_length {log['request_length']} != wire {wire.request_size}")
    return fatal, notes


def build_truth(fixture: Fixture, capture_name: str, checked: list[Checked], port: int, note: str = "") -> dict:
    if fixture.event is not None:
        return _configured_truth(fixture, capture_name, checked, port, note)
    billed = [c for c in checked if c.log["consumer"] and c.log["status"] != 401]
    events = [
        {
            "subject": c.log["consumer"],
            "method": c.log["request_method"],
            "uri": strip_key_params(c.log["request_uri"]),
            "status": c.log["status"],
            "request_size": c.log["request_length"],
            "response_size": c.log["bytes_sent"],
        }
        for c in billed
    ]
    rejected = sum(1 for c in checked if c.log["status"] == 401)
    description = fixture.description + note + (
        " Truth from nginx's access log ($request_length, $bytes_sent, resolved consumer), checked byte for byte "
        "against the capture; events in the order of the requests' first bytes on the wire.")
    return {
        "capture": capture_name,
        "made_by": MADE_BY,
        "description": description,
        "ports": [port],
        "args": [],
        "events": events,
        "counters": {"rejected": rejected, "gaps": 0, "parse_errors": 0},
    }


def _configured_truth(fixture: Fixture, capture_name: str, checked: list[Checked], port: int, note: str) -> dict:
    """The truth of a fixture recorded with a gateway configuration: its own rules say what is billed."""
    assert fixture.event is not None and fixture.counters is not None
    events = [event for event in map(fixture.event, checked) if event is not None]
    description = fixture.description + note + (
        " Truth from nginx's access log (the location that answered, $request_length, $bytes_sent, resolved "
        "consumer, the headers attributes come from), checked byte for byte against the capture; events in the "
        "order of the requests' first bytes on the wire.")
    return {"capture": capture_name, "made_by": MADE_BY, "description": description, "ports": [port],
            "args": ["--credentials", str(fixture.deck.relative_to(fixture.deck.parent.parent))],
            "events": events, "counters": {**fixture.counters(checked), "gaps": 0, "parse_errors": 0}}


# ---------------------------------------------------------------------------------------------------
# Recording


DISCARD_NOTE = (" nginx's $request_length counts only what it read of a request it answered 401 before the body "
                "arrived (the rest is discarded unread); no such request is an event, so the truth is unaffected.")


def record(fixture: Fixture, out_dir: Path, port: int, workdir: Path) -> list[str]:
    """Record one fixture (and its variants), check it, then move it into `out_dir`; returns report lines.

    Everything is written to a staging folder first, so a failed check never leaves a half-made fixture.
    """
    staging = workdir / fixture.name
    staging.mkdir()
    main_capture = staging / f"{fixture.name}.pcap"
    any_capture = staging / f"{fixture.name}-any.pcap"
    targets = [("lo", main_capture)] + ([("any", any_capture)] if fixture.variants else [])
    entries = run_scenario(fixture, targets, port, workdir)
    checked, notes = verify(fixture, entries, main_capture, port)
    captures = {fixture.name: (main_capture, "")}
    if fixture.variants:
        captures.update(_write_variants(fixture.name, main_capture, any_capture))
    report = []
    for name, (capture, variant_note) in captures.items():
        if capture != main_capture:
            _verify_variant(entries, checked, capture, port)
        truth = build_truth(fixture, capture.name, checked, port, variant_note + (DISCARD_NOTE if notes else ""))
        (staging / f"{name}.truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
        report.append(f"{name}: {capture.name} {capture.stat().st_size} bytes, {len(entries)} requests, "
                      f"{len(truth['events'])} billed, {truth['counters']['rejected']} rejected")
    for path in staging.iterdir():
        shutil.move(path, out_dir / path.name)
    return report + _findings(checked, notes)


def run_scenario(fixture: Fixture, targets: list[tuple[str, Path]], port: int, workdir: Path) -> list[dict]:
    """Start a fresh gateway and the capture, send the theme's traffic, return nginx's log lines."""
    traffic = Traffic(port=port, workdir=workdir)
    with KongStandin(port=port, deck_file=fixture.deck, routes=fixture.routes) as gateway:
        with capturing(targets, port):
            fixture.scenario(traffic)
            entries = gateway.access_log_entries(expect=traffic.sent)
    if len(entries) != traffic.sent:
        raise RecordError(f"{fixture.name}: sent {traffic.sent} requests, nginx logged {len(entries)}")
    return entries


def verify(fixture: Fixture, entries: list[dict], capture: Path, port: int) -> tuple[list[Checked], list[str]]:
    """All checks of the log against the capture; returns the paired requests and explained differences."""
    checked = match_log_to_wire(entries, capture, port, load_consumers(fixture.deck))
    try:
        if fixture.check:
            fixture.check(checked)
        fatal, notes = size_findings(checked)
        if fatal:
            raise RecordError("nginx's byte counts differ from the wire:\n  " + "\n  ".join(fatal))
        counted = tshark_request_count(capture, port)
        if counted != len(entries):
            raise RecordError(f"tshark sees {counted} HTTP requests, nginx logged {len(entries)}")
    except RecordError as error:
        raise RecordError(f"{fixture.name}: {error}") from None
    return checked, notes


def _verify_variant(entries: list[dict], checked: list[Checked], capture: Path, port: int) -> None:
    """A copy must read back to the same requests, in the same order, as the capture it was made from."""
    again = match_log_to_wire(entries, capture, port, load_consumers(DEFAULT_DECK_FILE))
    if [c.log for c in again] != [c.log for c in checked]:
        raise RecordError(f"{capture.name}: requests differ from the original capture")
    counted = tshark_request_count(capture, port)
    if counted != len(entries):
        raise RecordError(f"{capture.name}: tshark sees {counted} HTTP requests, nginx logged {len(entries)}")


def _findings(checked: list[Checked], notes: list[str]) -> list[str]:
    """What the checks established about nginx's byte counts, for the person running the recorder."""
    lines = [f"  note: {note}" for note in notes]
    lines += [f"  100 Continue: {_label(c.log)}: "
              f"$bytes_sent {c.log['bytes_sent']} = wire {c.wire.response_size}, interim response included"
              for c in checked if c.wire.interim_responses]
    lines += [f"  chunked upload: {_label(c.log)}: "
              f"$request_length {c.log['request_length']} = wire {c.wire.request_size}, chunk framing included"
              for c in checked if c.log["http_transfer_encoding"] and c.log["request_length"] == c.wire.request_size]
    return lines


def _write_variants(name: str, capture: Path, any_capture: Path) -> dict[str, tuple[Path, str]]:
    """The same traffic in other container formats and link types, beside the original."""
    pcapng = capture.with_name(f"{name}-ng.pcapng")
    subprocess.run(["editcap", "-F", "pcapng", str(capture), str(pcapng)], check=True, capture_output=True,
                   timeout=60)
    gzipped = capture.with_name(f"{name}-gz.pcap.gz")
    with open(capture, "rb") as source, gzip.GzipFile(gzipped, "wb", mtime=0) as target:
        shutil.copyfileobj(source, target)
    linktype = _linktype_name(any_capture)
    return {
        f"{name}-ng": (pcapng, f" (Same traffic as {name}.pcap, converted to pcapng.)"),
        f"{name}-gz": (gzipped, f" (Same traffic as {name}.pcap, gzip-compressed pcap.)"),
        f"{name}-any": (any_capture, f" (The same traffic recorded at the same time with tcpdump -i any: "
                                     f"link type {linktype}.)"),
    }


def _linktype_name(capture: Path) -> str:
    result = subprocess.run(["capinfos", "-E", "-T", "-r", str(capture)], capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.strip().split("\t")[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "captures",
                        help="folder for the captures and truth files")
    parser.add_argument("--port", type=int, default=8000, help="gateway port to record on")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="record only these fixtures")
    args = parser.parse_args(argv)
    chosen = [f for f in FIXTURES if not args.only or f.name in args.only]
    if args.only and len(chosen) != len(args.only):
        parser.error(f"unknown fixture; known: {', '.join(f.name for f in FIXTURES)}")
    for tool in ("nginx", "tcpdump", "tshark", "editcap", "capinfos", "curl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is required")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="record-fixtures-") as workdir:
            for fixture in chosen:
                for line in record(fixture, args.out, args.port, Path(workdir)):
                    print(line)
    except (RecordError, StandinError, OSError, subprocess.SubprocessError, httpx.HTTPError) as error:
        print(f"record_fixtures: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
