#!/usr/bin/env python3
"""Craft capture fixtures that a real server will not produce on demand.

Reordering, retransmissions, overlaps, lost segments, mid-stream starts, odd link types and corrupt
packets cannot be recorded reliably from a live nginx, so they are built here byte by byte with scapy
and written with scapy's pcap/pcapng writers (nothing is ever sent on a network). Each fixture gets a
`captures/crafted-NAME.truth.json` whose expected values are computed from the very bytes crafted, in
the format of captures/README.md.

Everything is seeded from the fixture's name and time starts at 2026-01-01T00:00:00Z, so running the
script twice writes byte-identical files.

    python3 scripts/craft_fixtures.py                 # all fixtures into captures/
    python3 scripts/craft_fixtures.py --out DIR NAME  # some fixtures elsewhere
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote

import yaml
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether, Loopback
from scapy.packet import Packet, Raw
from scapy.utils import RawPcapNgWriter, RawPcapWriter

REPO = Path(__file__).resolve().parent.parent
CAPTURES = REPO / "captures"
MADE_BY = "scripts/craft_fixtures.py"

BASE_TIME_US = 1_767_225_600 * 1_000_000  # 2026-01-01T00:00:00Z
GATEWAY_PORT = 8000
GATEWAY_V4 = "10.0.0.10"
GATEWAY_V6 = "2001:db8::10"
GATEWAY_MAC = "02:00:5e:00:00:0a"
ROUTER_MAC = "02:00:5e:00:00:01"
MSS = 1448

DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_LINUX_SLL, DLT_LINUX_SLL2 = 0, 1, 101, 113, 276

# Keys from captures/kong.yaml (checked against it at start-up) and keys the gateway does not know.
ALICE = "alice-key-7f3a9c"
BOB = "bob-key-41d2e8"
CAROL_OLD = "carol-key-old-5b7e"
CAROL_NEW = "carol-key-new-9c1f"
M42 = "m42-key-e6a0b3"
KNOWN_KEYS = (ALICE, BOB, CAROL_OLD, CAROL_NEW, M42)
UNKNOWN = "mallory-key-000000"

HOST = "api.example.test"
DATE = "Thu, 01 Jan 2026 00:00:00 GMT"
KONG = "kong/3.9.1"
REASONS = {
    100: "Continue", 101: "Switching Protocols", 102: "Processing", 103: "Early Hints",
    200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
    401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
}


def load_subjects(kong_yaml: Path) -> dict[str, str]:
    """Key -> event subject: the username, or the consumer id when it has none (Kong's default)."""
    doc = yaml.safe_load(kong_yaml.read_text())
    return {
        cred["key"]: consumer.get("username") or consumer["id"]
        for consumer in doc["consumers"]
        for cred in consumer.get("keyauth_credentials", [])
    }


# --------------------------------------------------------------------------------------------- HTTP


def request(method: str, target: str, key: str | None = None, *, body: bytes = b"",
            headers: Sequence[str] = (), version: str = "HTTP/1.1", host: str = HOST,
            key_header: str = "apikey", length: bool = True) -> bytes:
    """A curl-like request; the key goes in a header unless the target already carries it."""
    lines = [f"{method} {target} {version}", f"Host: {host}", "User-Agent: curl/8.5.0", "Accept: */*"]
    if key is not None:
        lines.append(f"{key_header}: {key}")
    lines += headers
    if body and length:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def interim(status: int, headers: Sequence[str] = ()) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status} {REASONS[status]}", *headers]) + "\r\n\r\n").encode()


def json_body(rng: random.Random, items: int) -> bytes:
    orders = [
        {"id": 1000 + i, "total": f"{rng.randrange(100, 99999) / 100:.2f}",
         "status": rng.choice(["new", "paid", "shipped", "delivered"])}
        for i in range(items)
    ]
    return json.dumps({"orders": orders}, separators=(",", ":")).encode()


def csv_body(rng: random.Random, size: int) -> bytes:
    """Text that never contains an HTTP start line, so a resync cannot be fooled by a body."""
    rows = ["day,orders,revenue"]
    while sum(len(r) + 1 for r in rows) < size:
        rows.append(f"2025-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d},"
                    f"{rng.randrange(1, 500)},{rng.randrange(100, 99999)}.{rng.randrange(100):02d}")
    return ("\n".join(rows) + "\n").encode()[:size]


class Http:
    """Kong-shaped responses; request ids come from the fixture's rng so output stays fixed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def request_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def proxied(self, status: int, body: bytes = b"", *, headers: Sequence[str] = (),
                content_type: str = "application/json", length: bool = True,
                version: str = "HTTP/1.1", connection: str = "keep-alive") -> bytes:
        """A response from the upstream, as Kong passes it on (with its X-Kong-* and Via headers)."""
        lines = [f"{version} {status} {REASONS[status]}"]
        if body or length:
            lines.append(f"Content-Type: {content_type}")
        if length:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"Connection: {connection}", f"Date: {DATE}", "Server: gunicorn", *headers,
                  f"X-Kong-Upstream-Latency: {self.rng.randrange(2, 40)}",
                  f"X-Kong-Proxy-Latency: {self.rng.randrange(0, 3)}",
                  f"Via: 1.1 {KONG}", f"X-Kong-Request-Id: {self.request_id()}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def generated(self, status: int, message: str, headers: Sequence[str] = (),
                  connection: str = "keep-alive") -> bytes:
        """A response Kong makes itself (401 from key-auth, 429 from rate limiting, 400 from nginx)."""
        rid = self.request_id()
        body = f'{{\n  "message":"{message}",\n  "request_id":"{rid}"\n}}'.encode()
        lines = [f"HTTP/1.1 {status} {REASONS[status]}", f"Date: {DATE}",
                 "Content-Type: application/json; charset=utf-8", f"Connection: {connection}",
                 *headers, f"Content-Length: {len(body)}", "X-Kong-Response-Latency: 0",
                 f"Server: {KONG}", f"X-Kong-Request-Id: {rid}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def unauthorized(self, missing: bool = False) -> bytes:
        message = "No API key found in request" if missing else "Unauthorized"
        return self.generated(401, message, ["WWW-Authenticate: Key"])

    def ok(self, items: int = 2, status: int = 200) -> bytes:
        return self.proxied(status, json_body(self.rng, items))


# ---------------------------------------------------------------------------------------- truth


def split_target(target: str) -> tuple[str, list[str]]:
    path, _, query = target.partition("?")
    return path, (query.split("&") if query else [])


def key_of(raw_request: bytes) -> str | None:
    """key-auth: header `apikey` (name case-insensitive) first, then query `apikey` (case-sensitive)."""
    head = raw_request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    for line in head[1:]:
        name, colon, value = line.partition(":")
        if colon and name.lower() == "apikey":
            return value.strip(" \t")
    for param in split_target(head[0].split(" ")[1])[1]:
        name, _, value = param.partition("=")
        if name == "apikey":
            return unquote(value)
    return None


def hidden_uri(raw_request: bytes) -> str:
    """The request target with every `apikey` query parameter removed, as hide_credentials does."""
    target = raw_request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]
    path, params = split_target(target)
    kept = [p for p in params if p.partition("=")[0] != "apikey"]
    return path + ("?" + "&".join(kept) if kept else "")


def status_of(raw_response: bytes) -> int:
    return int(raw_response.split(b" ", 2)[1])


@dataclass
class Exchange:
    """One request as the client sent it and every response byte the server sent for it."""

    conn: Conn
    start: int  # offset of the request's first byte in the client stream
    request: bytearray
    responses: list[bytes] = field(default_factory=list)
    lost: str | None = None  # why the agent cannot see it ("gap", ...); lost exchanges are not expected
    first_us: int | None = None  # capture time of the first packet carrying any of its bytes

    def status(self) -> int:
        return status_of(self.responses[-1]) if self.responses else 0


# -------------------------------------------------------------------------------------- packets


@dataclass
class Frame:
    """A crafted IP packet plus what the truth bookkeeping needs to know about it."""

    pkt: Packet
    conn: Conn | None = None
    from_client: bool = True
    start: int = 0
    length: int = 0


class Conn:
    """One TCP connection, client -> gateway:8000; it builds frames with correct seq/ack but never
    emits them, so a scenario may reorder, duplicate, drop, split or overlap them at will."""

    def __init__(self, cap: "Capture", client: str, cport: int, server: str, sport: int,
                 isn_c: int, isn_s: int) -> None:
        self.cap, self.sport, self.cport = cap, sport, cport
        self.client_addr, self.server_addr = client, server
        self.v6 = ":" in client
        self.isn = {True: isn_c, False: isn_s}
        self.data = {True: bytearray(), False: bytearray()}
        self.fin_sent = {True: False, False: False}
        self.ip_id = {True: cap.rng.randrange(1, 65536), False: cap.rng.randrange(1, 65536)}
        self.exchanges: list[Exchange] = []

    def next_seq(self, from_client: bool) -> int:
        sent = len(self.data[from_client]) + self.fin_sent[from_client]
        return (self.isn[from_client] + 1 + sent) % 2**32

    def _seq_at(self, from_client: bool, offset: int) -> int:
        return (self.isn[from_client] + 1 + offset) % 2**32

    def _frame(self, from_client: bool, flags: str, seq: int, payload: bytes = b"",
               start: int = 0, options: list | None = None) -> Frame:
        src, dst = ((self.client_addr, self.server_addr) if from_client
                    else (self.server_addr, self.client_addr))
        sport, dport = (self.cport, self.sport) if from_client else (self.sport, self.cport)
        if self.v6:
            ip: Packet = IPv6(src=src, dst=dst, hlim=64)
        else:
            self.ip_id[from_client] = self.ip_id[from_client] % 65535 + 1
            ip = IP(src=src, dst=dst, id=self.ip_id[from_client], flags="DF", ttl=64)
        ack = self.next_seq(not from_client) if "A" in flags else 0
        tcp = TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=502,
                  options=options or [])
        pkt = ip / tcp / Raw(payload) if payload else ip / tcp
        return Frame(pkt, self, from_client, start, len(payload))

    # handshake and teardown
    def syn(self) -> Frame:
        return self._frame(True, "S", self.isn[True], options=self._syn_options())

    def synack(self) -> Frame:
        return self._frame(False, "SA", self.isn[False], options=self._syn_options())

    def _syn_options(self) -> list:
        return [("MSS", 1440 if self.v6 else 1460), ("SAckOK", b""), ("WScale", 7)]

    def handshake(self) -> list[Frame]:
        return [self.syn(), self.synack(), self.ack(True)]

    def ack(self, from_client: bool) -> Frame:
        return self._frame(from_client, "A", self.next_seq(from_client))

    def fin(self, from_client: bool) -> Frame:
        frame = self._frame(from_client, "FA", self.next_seq(from_client))
        self.fin_sent[from_client] = True
        return frame

    def rst(self, from_client: bool) -> Frame:
        return self._frame(from_client, "RA", self.next_seq(from_client))

    def close(self, by_client: bool = True) -> list[Frame]:
        first = self.fin(by_client)
        return [first, self.fin(not by_client), self.ack(by_client)]

    # data
    def send(self, from_client: bool, data: bytes, split: int | Sequence[int] | None = None) -> list[Frame]:
        """Append `data` to one direction's stream; `split` is a part count or a list of segment sizes."""
        start = len(self.data[from_client])
        self.data[from_client] += data
        frames = []
        for offset, size in _segments(len(data), split):
            frames.append(self.segment(from_client, start + offset, start + offset + size))
        return frames

    def client(self, data: bytes, split: int | Sequence[int] | None = None) -> list[Frame]:
        return self.send(True, data, split)

    def server(self, data: bytes, split: int | Sequence[int] | None = None) -> list[Frame]:
        return self.send(False, data, split)

    def segment(self, from_client: bool, start: int, end: int, payload: bytes | None = None) -> Frame:
        """A segment for stream bytes [start, end): a first send, a retransmission or an overlap;
        `payload` replaces the bytes (an overlap with different content)."""
        stream = self.data[from_client]
        assert 0 <= start < end <= len(stream), "a segment must carry bytes already in the stream"
        body = bytes(stream[start:end]) if payload is None else payload
        assert len(body) == end - start
        return self._frame(from_client, "PA", self._seq_at(from_client, start), body, start)

    # exchanges (the truth bookkeeping)
    def request(self, data: bytes, split: int | Sequence[int] | None = None) -> tuple[Exchange, list[Frame]]:
        exchanges, frames = self.pipeline([data], split)
        return exchanges[0], frames

    def pipeline(self, requests: Sequence[bytes], split: int | Sequence[int] | None = None
                 ) -> tuple[list[Exchange], list[Frame]]:
        """Several requests written back to back (pipelined), segmented as one stream chunk."""
        offset = len(self.data[True])
        exchanges = []
        for raw in requests:
            exchanges.append(Exchange(self, offset, bytearray(raw)))
            offset += len(raw)
        self.exchanges += exchanges
        self.cap.exchanges += exchanges
        return exchanges, self.client(b"".join(requests), split)

    def extend(self, exchange: Exchange, data: bytes, split: int | Sequence[int] | None = None) -> list[Frame]:
        """More bytes of the same request (a body sent after `100 Continue`)."""
        assert exchange.start + len(exchange.request) == len(self.data[True])
        exchange.request += data
        return self.client(data, split)

    def respond(self, exchange: Exchange, data: bytes, split: int | Sequence[int] | None = None) -> list[Frame]:
        return self.respond_all([(exchange, data)], split)

    def respond_all(self, answers: Sequence[tuple[Exchange, bytes]],
                    split: int | Sequence[int] | None = None) -> list[Frame]:
        for exchange, data in answers:
            exchange.responses.append(data)
        return self.server(b"".join(data for _, data in answers), split)

    def roundtrip(self, req: bytes, resp: bytes, req_split: int | Sequence[int] | None = None,
                  resp_split: int | Sequence[int] | None = None) -> tuple[Exchange, list[Frame]]:
        """The common case: request, response, client ACK, in order."""
        exchange, frames = self.request(req, req_split)
        frames += self.respond(exchange, resp, resp_split)
        return exchange, frames + [self.ack(True)]


def _segments(total: int, split: int | Sequence[int] | None) -> list[tuple[int, int]]:
    if split is None:
        sizes = [MSS] * (total // MSS) + ([total % MSS] if total % MSS else [])
    elif isinstance(split, int):
        base, extra = divmod(total, split)
        sizes = [base + (i < extra) for i in range(split)]
    else:
        sizes = list(split)
        if sum(sizes) < total:
            sizes.append(total - sum(sizes))
    assert sum(sizes) == total and all(s > 0 for s in sizes), (total, split)
    out, offset = [], 0
    for size in sizes:
        out.append((offset, size))
        offset += size
    return out


# -------------------------------------------------------------------------------------- capture


def _ethertype(pkt: Packet) -> int:
    return 0x86DD if isinstance(pkt, IPv6) else 0x0800


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) + b"\0\0"


LINKS: dict[str, tuple[int, Callable[[Frame, int], Packet | bytes]]] = {
    # name: (DLT, wrap(frame, pkttype)); pkttype is the SLL packet type (0 to us, 4 outgoing)
    "ether": (DLT_EN10MB, lambda f, _: Ether(src=ROUTER_MAC if f.from_client else GATEWAY_MAC,
                                             dst=GATEWAY_MAC if f.from_client else ROUTER_MAC) / f.pkt),
    "vlan": (DLT_EN10MB, lambda f, _: Ether(src=ROUTER_MAC if f.from_client else GATEWAY_MAC,
                                            dst=GATEWAY_MAC if f.from_client else ROUTER_MAC)
             / Dot1Q(vlan=100) / f.pkt),
    "qinq": (DLT_EN10MB, lambda f, _: Ether(src=ROUTER_MAC if f.from_client else GATEWAY_MAC,
                                            dst=GATEWAY_MAC if f.from_client else ROUTER_MAC)
             / Dot1AD(vlan=200) / Dot1Q(vlan=100) / f.pkt),
    "sll": (DLT_LINUX_SLL, lambda f, t: CookedLinux(
        pkttype=t, lladdrtype=1, lladdrlen=6, proto=_ethertype(f.pkt),
        src=_mac_bytes(ROUTER_MAC if f.from_client else GATEWAY_MAC)) / f.pkt),
    "sll-lo": (DLT_LINUX_SLL, lambda f, t: CookedLinux(
        pkttype=t, lladdrtype=772, lladdrlen=6, proto=_ethertype(f.pkt), src=b"\0" * 8) / f.pkt),
    "sll2": (DLT_LINUX_SLL2, lambda f, t: CookedLinuxV2(
        proto=_ethertype(f.pkt), ifindex=2, lladdrtype=1, pkttype=t, lladdrlen=6,
        src=_mac_bytes(ROUTER_MAC if f.from_client else GATEWAY_MAC)) / f.pkt),
    "raw": (DLT_RAW, lambda f, _: f.pkt),
    "null": (DLT_NULL, lambda f, _: Loopback(type=30 if isinstance(f.pkt, IPv6) else 2) / f.pkt),
}


class Capture:
    """Packets with timestamps plus the exchanges they carry; writes the capture and its truth."""

    def __init__(self, name: str, link: str, subjects: dict[str, str]) -> None:
        self.name = name
        self.rng = random.Random(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big"))
        self.http = Http(self.rng)
        self.link = link
        self.subjects = subjects
        self.now_us = BASE_TIME_US
        self.records: list[tuple[int, bytes, int]] = []  # (time in µs, frame bytes, wire length)
        self.exchanges: list[Exchange] = []
        self.pinned: dict[str, int] = {}
        self.exit_status = 0  # a replay's; 3: the capture lost packets (README, exit statuses)
        self._isns: set[int] = set()
        self._endpoints: set[tuple[str, int]] = set()

    def conn(self, client: str, cport: int | None = None, *, server: str | None = None,
             sport: int = GATEWAY_PORT, isn_c: int | None = None, isn_s: int | None = None) -> Conn:
        """A new connection with fresh, distinct ISNs and a client port not used before."""
        server = server or (GATEWAY_V6 if ":" in client else GATEWAY_V4)
        while cport is None or (client, cport) in self._endpoints:
            cport = self.rng.randrange(32768, 61000)
        self._endpoints.add((client, cport))
        return Conn(self, client, cport, server, sport, self._isn(isn_c), self._isn(isn_s))

    def _isn(self, wanted: int | None) -> int:
        isn = wanted if wanted is not None else self.rng.getrandbits(32)
        while isn in self._isns:
            isn = self.rng.getrandbits(32)
        self._isns.add(isn)
        return isn

    def wait(self, seconds: float) -> None:
        self.now_us += round(seconds * 1_000_000)

    def emit(self, *frames: Frame | Sequence[Frame], step_us: int = 1000, duplicate: bool = False) -> None:
        """Append frames in the given order, `step_us` apart; `duplicate` writes each twice, as a
        capture on the `any` device sees loopback traffic (outgoing copy, then incoming copy)."""
        for frame in _flatten(frames):
            self.emit_at(self.now_us, frame, 4 if duplicate else self._pkttype(frame))
            if duplicate:
                self.emit_at(self.now_us + 1, frame, 0)
            self.now_us += step_us

    def emit_at(self, time_us: int, frame: Frame, pkttype: int | None = None) -> None:
        assert not self.records or time_us >= self.records[-1][0], "time must not go backwards"
        wrap = LINKS[self.link][1]
        data = bytes(wrap(frame, self._pkttype(frame) if pkttype is None else pkttype))
        self.records.append((time_us, data, len(data)))
        self.now_us = max(self.now_us, time_us)
        if frame.conn is not None and frame.from_client and frame.length:
            for exchange in frame.conn.exchanges:
                overlaps = (exchange.start < frame.start + frame.length
                            and frame.start < exchange.start + len(exchange.request))
                if overlaps and exchange.first_us is None:
                    exchange.first_us = time_us

    @staticmethod
    def _pkttype(frame: Frame) -> int:
        return 0 if frame.from_client else 4  # the capture runs on the gateway host

    def emit_bytes(self, data: bytes, wirelen: int | None = None, step_us: int = 1000) -> None:
        """A frame given as link-layer bytes (corrupt or truncated); `wirelen` > len(data) = truncated."""
        self.records.append((self.now_us, data, wirelen or len(data)))
        self.now_us += step_us

    def pin(self, **counters: int) -> None:
        """Counters the fixture is about, beyond those the exchanges imply."""
        self.pinned.update(counters)

    # output
    def truth(self, description: str, capture_name: str) -> dict:
        events, counters = [], {"rejected": 0, "unresolved": 0, "unanswered": 0}
        seen = [x for x in self.exchanges if x.lost is None and x.conn.sport == GATEWAY_PORT]
        assert all(x.first_us is not None for x in seen), "an expected request was never emitted"
        order = {id(x): i for i, x in enumerate(self.exchanges)}
        for x in sorted(seen, key=lambda x: (x.first_us, order[id(x)])):
            raw = bytes(x.request)
            key = key_of(raw)
            subject = self.subjects.get(key) if key is not None else None
            status = x.status()
            if status == 401:
                counters["rejected"] += 1
            elif not raw.split(b" ", 2)[1].startswith(b"/"):
                # kong.yaml's routes are all path prefixes: a target that is no path matches none of them
                counters["no_route"] = counters.get("no_route", 0) + 1
            elif subject is None:
                counters["unresolved"] += 1
            else:
                counters["unanswered"] += status == 0
                events.append({
                    "subject": subject, "method": raw.split(b" ", 1)[0].decode(),
                    "uri": hidden_uri(raw), "status": status, "request_size": len(raw),
                    "response_size": sum(len(r) for r in x.responses),
                })
        counters = {k: v for k, v in counters.items() if v}
        for name, value in self.pinned.items():
            assert counters.get(name, value) == value, f"pinned {name}={value} contradicts the exchanges"
            counters[name] = value
        truth = {"capture": capture_name, "made_by": MADE_BY, "description": description,
                 "ports": [GATEWAY_PORT], "args": [], "events": events, "counters": counters}
        if self.exit_status:
            truth["exit_status"] = self.exit_status
        return truth

    def pcap_bytes(self) -> bytes:
        buf = io.BytesIO()
        writer = RawPcapWriter(buf, endianness="<", snaplen=262144)
        writer.linktype = LINKS[self.link][0]  # set here: the constructor ignores DLT_NULL (0)
        writer.write_header(None)
        for time_us, data, wirelen in self.records:
            writer.write_packet(data, sec=time_us // 1_000_000, usec=time_us % 1_000_000, wirelen=wirelen)
        writer.flush()
        return buf.getvalue()

    def write_pcapng(self, path: Path) -> None:
        writer = RawPcapNgWriter(str(path))
        writer.linktype = LINKS[self.link][0]
        writer.write_header(None)
        for time_us, data, wirelen in self.records:
            writer.write_packet(data, sec=Decimal(time_us) / 1_000_000, wirelen=wirelen)
        writer.close()


def _flatten(items: Sequence[Frame | Sequence[Frame]]) -> list[Frame]:
    out: list[Frame] = []
    for item in items:
        out.extend([item] if isinstance(item, Frame) else item)
    return out


# ------------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Fixture:
    name: str
    description: str
    build: Callable[[Capture], None]
    link: str = "ether"
    container: str = "pcap"  # pcap | pcapng | pcap.gz


FIXTURES: dict[str, Fixture] = {}


def fixture(name: str, description: str, link: str = "ether", container: str = "pcap"):
    def register(build: Callable[[Capture], None]) -> Callable[[Capture], None]:
        FIXTURES[name] = Fixture(name, " ".join(description.split()), build, link, container)
        return build
    return register


def client_ip(cap: Capture) -> str:
    return f"10.1.{cap.rng.randrange(0, 256)}.{cap.rng.randrange(1, 255)}"


@fixture("out-of-order", """
    Out-of-order segments. Conn 1 (alice): POST /orders whose request is split in 3 segments captured
    in the order 3,1,2 and whose 201 response (3 segments) is captured 2,3,1; then a GET on the same
    connection whose 2-segment request and response are both captured reversed. Conn 2 (bob): the
    first request segment is captured before the handshake's final ACK. Expected: 3 events, gaps 0.""")
def out_of_order(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    post, req = c.request(request("POST", "/orders", ALICE, body=json_body(cap.rng, 3)), split=3)
    cap.emit(req[2], req[0], req[1], c.ack(False))
    resp = c.respond(post, h.ok(items=60, status=201), split=3)
    cap.emit(resp[1], resp[2], resp[0], c.ack(True))
    get, req = c.request(request("GET", "/orders/1001?expand=items", ALICE,
                                 headers=[f"Cookie: session={'c' * 200}"]), split=2)
    cap.emit(req[1], req[0])
    cap.emit(list(reversed(c.respond(get, h.ok(items=40), split=2))), c.ack(True))
    cap.emit(c.close())

    c = cap.conn(client_ip(cap))
    syn, synack, ack = c.handshake()
    _, frames = c.roundtrip(request("GET", "/orders?page=2", BOB), h.ok())
    cap.emit(syn, synack, frames[0], ack, frames[1:], c.close(by_client=False))
    cap.pin(gaps=0)


@fixture("retransmission", """
    Retransmissions and overlaps on one connection whose client and server sequence numbers both wrap
    past 2^32 inside the first exchange. The SYN is sent twice. The POST /orders (alice, 3 segments)
    shows: segment 1, a retransmission starting inside segment 1 and running into new bytes (same
    content), segment 2 again, segment 3. Its 200 response shows a duplicated segment and an
    overlapping retransmission whose overlapping BODY bytes differ from the first copy (sizes do not
    depend on which copy wins). The second request (bob GET) is retransmitted whole, once before and
    once after its response (spurious); the FIN is retransmitted. Expected: 2 events, gaps 0.""")
def retransmission(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap), isn_c=0xFFFFF9F7, isn_s=0xFFFFFEA3)
    syn = c.syn()
    cap.emit(syn)
    cap.wait(1.0)
    cap.emit(syn, c.synack(), c.ack(True))
    post, req = c.request(request("POST", "/orders", ALICE, body=json_body(cap.rng, 60)), split=3)
    s1, s2, s3 = req
    cap.emit(s1, c.segment(True, s1.start + s1.length // 2, s2.start + s2.length // 2), s2, s3, c.ack(False))
    r1, r2, r3 = c.respond(post, h.ok(items=70), split=3)
    body_start = bytes(c.data[False]).index(b"\r\n\r\n", r1.start) + 4
    assert body_start < r1.start + r1.length - 100
    start, end = r1.start + r1.length - 100, r2.start + 50
    altered = bytes(c.data[False][start:end]).replace(b"shipped", b"SHIPPED").replace(b"paid", b"PAID")
    assert altered != bytes(c.data[False][start:end]), "the overlap must differ in content"
    cap.emit(r1, r2, r2, c.segment(False, start, end, altered), r3, c.ack(True))

    get, req = c.request(request("GET", "/orders/1042", BOB))
    cap.emit(req)
    cap.wait(0.2)
    cap.emit(req, c.respond(get, h.ok()), req, c.ack(True))
    fin = c.fin(True)
    cap.emit(fin, fin, c.fin(False), c.ack(True))
    cap.pin(gaps=0)


@fixture("duplicated", """
    Every packet captured twice, as `tcpdump -i any` shows loopback traffic (Linux cooked SLL,
    outgoing copy then incoming copy, 1 µs apart), client and gateway both 127.0.0.1. Two connections:
    alice GET + bob POST on the first, a request without a key (401) on the second. Expected: 2 events,
    rejected 1, gaps 0 (duplicates are neither new requests nor holes).""", link="sll-lo")
def duplicated(cap: Capture) -> None:
    h = cap.http
    c = cap.conn("127.0.0.1", server="127.0.0.1")
    cap.emit(c.handshake(), duplicate=True)
    cap.emit(c.roundtrip(request("GET", "/orders?page=1", ALICE), h.ok(items=30))[1], duplicate=True)
    cap.emit(c.roundtrip(request("POST", "/orders", BOB, body=json_body(cap.rng, 2)),
                         h.ok(status=201))[1], duplicate=True)
    cap.emit(c.close(), duplicate=True)
    c = cap.conn("127.0.0.1", server="127.0.0.1")
    cap.emit(c.handshake(), duplicate=True)
    cap.emit(c.roundtrip(request("GET", "/orders"), h.unauthorized(missing=True))[1], duplicate=True)
    cap.emit(c.close(), duplicate=True)
    cap.pin(gaps=0)


@fixture("midstream", """
    The capture starts inside two established connections (no SYN seen). Conn 1: the first packets are
    the last 2 segments of a 200 response body (its request and head were before the capture), then
    alice GET /orders?page=2 with its response: only that one is billed. Conn 2: the first packets are
    the last 2 segments of a POST request BODY (head not captured), then the gateway's full 201
    response to it (a response whose request was never seen), then bob GET /orders/7 with its response:
    only that one is billed, with its own status and sizes (the orphan 201 must not be paired with it).
    The partial exchanges produce no event and no counter: gaps 0 (nothing was missing between seen
    bytes), unanswered 0.""")
def midstream(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    c.handshake()
    c.client(request("GET", "/reports/2025", ALICE))
    tail = c.server(h.proxied(200, csv_body(cap.rng, 8000), content_type="text/csv"))[-2:]
    cap.emit(tail, c.ack(True))
    cap.emit(c.roundtrip(request("GET", "/orders?page=2", ALICE), h.ok())[1])

    c = cap.conn(client_ip(cap))
    c.handshake()
    upload = request("POST", "/uploads", BOB, body=csv_body(cap.rng, 6000))
    cap.emit(c.client(upload)[-2:], c.ack(False))
    cap.emit(c.server(h.ok(status=201)), c.ack(True))
    cap.emit(c.roundtrip(request("GET", "/orders/7", BOB), h.ok(items=1))[1], c.close())
    cap.pin(gaps=0, unanswered=0)


@fixture("lost-body", """
    A segment missing inside a response body of known Content-Length (alice GET /reports/2025-12, 200,
    4-segment response, segment 3 never captured although the client ACKs past it). The exchange is
    billed with its full sizes and the connection goes on: the next alice request on it is billed too.
    Expected: 2 events, gaps 1.""")
def lost_body(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    report, req = c.request(request("GET", "/reports/2025-12", ALICE))
    resp = c.respond(report, h.proxied(200, csv_body(cap.rng, 5000), content_type="text/csv"))
    assert len(resp) == 4
    cap.emit(req, resp[0], resp[1], resp[3], c.ack(True))
    cap.emit(c.roundtrip(request("GET", "/orders?page=3", ALICE), h.ok())[1], c.close())
    cap.pin(gaps=1)


@fixture("lost-headers", """
    A segment missing inside request HEADERS: alice GET /orders/77 with a long Cookie header, 3 segments,
    the middle one never captured (the gateway ACKs past it and answers 200). That exchange is lost:
    no event, counted as one gap, and its 200 must not be paired with a later request. The following
    bob GET /orders/78 on the same connection is billed with its own status and sizes.
    Expected: 1 event, gaps 1, unanswered 0.""")
def lost_headers(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    lost, req = c.request(request("GET", "/orders/77", ALICE, headers=[
        f"Cookie: session={'a' * 900}; prefs={'b' * 900}", f"X-Trace: {'t' * 600}"]), split=3)
    lost.lost = "gap"
    cap.emit(req[0], req[2], c.ack(False), c.respond(lost, h.ok(items=5)), c.ack(True))
    cap.emit(c.roundtrip(request("GET", "/orders/78", BOB), h.ok(items=1, status=200))[1], c.close())
    cap.pin(gaps=1, unanswered=0)


@fixture("close-reset", """
    Ends of connections. Conn 1: alice GET then client FIN right after the request (half-close); the
    gateway still sends its 200 (2 segments) and then FINs: billed normally. Conn 2: bob GET
    /exports/full, the gateway sends the response head and the first 2 body segments of a 20000-byte
    Content-Length body, then the client RSTs: billed with status 200 and response_size = the bytes
    actually sent before the RST (head + 2 segments). Conn 3: carol GET /slow, then the gateway RSTs
    before any response: billed with status 0 and response_size 0. Expected: 3 events, unanswered 1.""")
def close_reset(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    get, req = c.request(request("GET", "/orders/5", ALICE, headers=["Connection: close"]))
    cap.emit(req, c.fin(True), c.ack(False))
    cap.emit(c.respond(get, h.proxied(200, json_body(cap.rng, 40), connection="close"), split=2))
    cap.emit(c.ack(True), c.fin(False), c.ack(True))

    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    export, req = c.request(request("GET", "/exports/full", BOB))
    full = h.proxied(200, csv_body(cap.rng, 20000), content_type="text/csv")
    head_len = full.index(b"\r\n\r\n") + 4
    sent = full[:head_len + 2 * MSS]
    cap.emit(req, c.ack(False), c.respond(export, sent, split=[head_len, MSS, MSS]), c.rst(True))

    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    _, req = c.request(request("GET", "/slow", CAROL_NEW))
    cap.emit(req, c.ack(False))
    cap.wait(2.0)
    cap.emit(c.rst(False))
    cap.pin(gaps=0)


@fixture("interleaved", """
    2000 connections from 2000 client endpoints, each with 1-3 keep-alive requests (GET or POST, keys of
    all five known credentials, some unknown or missing keys answered 401, some 404s which are billed),
    their packets interleaved in a seeded random order that keeps each connection's own order (several
    hundred connections open at once). Events are listed by the capture time of each request's first
    packet; compare them as a multiset if the agent emits in completion order.
    Expected: every request billed or rejected exactly once, gaps 0, unanswered 0.""")
def interleaved(cap: Capture) -> None:
    h, rng = cap.http, cap.rng
    keys = [ALICE, BOB, CAROL_OLD, CAROL_NEW, M42]
    timed: list[tuple[int, int, int, Frame]] = []
    for number in range(2000):
        c = cap.conn(f"10.20.{number // 250}.{number % 250 + 1}")
        frames = c.handshake()
        for _ in range(rng.randrange(1, 4)):
            roll = rng.random()
            key = UNKNOWN if roll < 0.04 else None if roll < 0.07 else rng.choice(keys)
            item = rng.randrange(1, 5000)
            if rng.random() < 0.25:
                req = request("POST", f"/orders?ref={item}", key, body=json_body(rng, 1))
            else:
                req = request("GET", rng.choice([f"/orders/{item}", f"/orders?page={item % 9 + 1}",
                                                 f"/customers/{item}/invoices"]), key)
            if key is None or key == UNKNOWN:
                resp = h.unauthorized(missing=key is None)
            else:
                resp = h.proxied(404, b'{"error":"not found"}') if rng.random() < 0.05 else h.ok(rng.randrange(0, 4))
            frames += c.roundtrip(req, resp)[1]
        frames += c.close(by_client=rng.random() < 0.7)
        time_us = BASE_TIME_US + rng.randrange(0, 2_000_000)
        for index, frame in enumerate(frames):
            timed.append((time_us, number, index, frame))
            time_us += rng.randrange(100, 60_000)
    for time_us, _, _, frame in sorted(timed, key=lambda t: t[:3]):
        cap.emit_at(time_us, frame)
    cap.pin(gaps=0, unanswered=0)


@fixture("http10-keepalive", """
    Conn 1: an HTTP/1.0 request (bob) answered by an HTTP/1.0 200 without Content-Length, its body in 3
    segments and delimited by the gateway's FIN (response_size = every byte up to the FIN). Conn 2:
    HTTP/1.1 keep-alive with a different key on each request: alice, bob, carol's old key, carol's
    new key, machine-42 (subject = its consumer id), an unknown key (401), no key (401), alice again.
    Expected: 7 events, rejected 2.""")
def http10_keepalive(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    get, req = c.request(request("GET", "/reports/daily", BOB, version="HTTP/1.0"))
    body = csv_body(cap.rng, 3500)
    cap.emit(req, c.ack(False), c.respond(get, h.proxied(200, body, version="HTTP/1.0", length=False,
                                                          content_type="text/csv", connection="close")))
    cap.emit(c.ack(True), c.fin(False), c.fin(True), c.ack(False))

    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    for key, path in [(ALICE, "/orders"), (BOB, "/orders?page=2"), (CAROL_OLD, "/customers/9"),
                      (CAROL_NEW, "/customers/9/invoices"), (M42, "/orders/31"), (UNKNOWN, "/orders"),
                      (None, "/orders"), (ALICE, "/orders/32")]:
        resp = h.unauthorized(missing=key is None) if key in (None, UNKNOWN) else h.ok()
        cap.emit(c.roundtrip(request("GET", path, key), resp)[1])
    cap.emit(c.close())


@fixture("pipelining", """
    Pipelining on one connection. Batch 1: four requests in ONE segment (alice GET, bob GET, an unknown
    key, machine-42 POST with a body); the responses come as: responses 1+2 in one segment, response 3
    split over two segments the second of which also starts response 4, then the rest of response 4.
    Batch 2: three requests (carol new key) whose boundaries fall mid-segment (2 segments), all three
    responses in one segment. Expected: 6 events in request order, rejected 1, unanswered 0.""")
def pipelining(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    batch = [request("GET", "/orders/1", ALICE), request("GET", "/orders/2", BOB),
             request("GET", "/orders/3", UNKNOWN),
             request("POST", "/orders", M42, body=json_body(cap.rng, 2))]
    exchanges, frames = c.pipeline(batch, split=1)
    cap.emit(frames, c.ack(False))
    answers = [h.ok(items=1), h.ok(items=2), h.unauthorized(), h.ok(items=3, status=201)]
    cut1 = len(answers[0]) + len(answers[1])
    cut2 = cut1 + len(answers[2]) - 40
    cap.emit(c.respond_all(list(zip(exchanges, answers)), split=[cut1, cut2 - cut1, 40 + 50]), c.ack(True))

    batch = [request("GET", f"/orders?page={n}", CAROL_NEW) for n in (1, 2, 3)]
    exchanges, frames = c.pipeline(batch, split=[len(batch[0]) + 17])
    cap.emit(frames, c.ack(False))
    cap.emit(c.respond_all([(x, h.ok(items=n)) for n, x in enumerate(exchanges, 1)], split=1))
    cap.emit(c.ack(True), c.close())


def chunked(chunks: Sequence[tuple[bytes, str]], trailers: Sequence[str]) -> bytes:
    """Chunked framing; each chunk is (data, extension) and the size is written in upper-case hex."""
    out = b"".join(f"{len(data):X}{ext}\r\n".encode() + data + b"\r\n" for data, ext in chunks)
    return out + b"0\r\n" + "".join(f"{t}\r\n" for t in trailers).encode() + b"\r\n"


@fixture("chunked", """
    Chunked bodies both ways on one keep-alive connection. alice POST /orders/bulk with a chunked
    request body (chunk extensions, a trailer, segments cut inside a chunk-size line) answered by a
    chunked 200 with extensions and two trailers (cut inside the trailer section); bob GET answered by a
    chunked 200 with an empty body (just the last-chunk); carol GET answered with Content-Length, to
    show the framing held. request_size and response_size include all chunk framing and trailers.
    Expected: 3 events, parse_errors 0.""")
def chunked_bodies(cap: Capture) -> None:
    h, rng = cap.http, cap.rng
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    body = chunked([(json_body(rng, 3), ";part=1"), (json_body(rng, 20), ';part=2;note="x y"'),
                    (b"\n", "")], ["X-Checksum: sha256=9f2c"])
    head = request("POST", "/orders/bulk", ALICE, headers=[
        "Content-Type: application/json", "Transfer-Encoding: chunked", "Trailer: X-Checksum"])
    bulk, req = c.request(head + body, split=[len(head) + 1, 300])
    resp_body = chunked([(json_body(rng, 40), ";src=cache"), (json_body(rng, 5), "")],
                        ["X-Orders-Count: 45", "X-Checksum: sha256=77aa"])
    resp = h.proxied(200, resp_body, length=False, headers=["Transfer-Encoding: chunked"])
    cap.emit(req, c.ack(False), c.respond(bulk, resp, split=[len(resp) - 30]), c.ack(True))
    empty = h.proxied(200, b"0\r\n\r\n", length=False, headers=["Transfer-Encoding: chunked"])
    cap.emit(c.roundtrip(request("GET", "/orders?status=none", BOB), empty)[1])
    cap.emit(c.roundtrip(request("GET", "/orders/12", CAROL_OLD), h.ok())[1], c.close())
    cap.pin(parse_errors=0)


@fixture("interim", """
    Interim 1xx responses on one keep-alive connection. alice POST /uploads with `Expect: 100-continue`:
    head, `100 Continue`, the 3-segment body, then 201 (request_size = head + body, response_size =
    the 100 and the 201). bob GET /reports/slow answered `102 Processing` then 200. carol GET /app
    answered by two `103 Early Hints` then 200. The status is the final one; response_size counts the
    interim responses. Expected: 3 events, unanswered 0, parse_errors 0.""")
def interim_responses(cap: Capture) -> None:
    h, rng = cap.http, cap.rng
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    body = csv_body(rng, 4000)
    head = request("POST", "/uploads", ALICE, headers=[
        "Content-Type: text/csv", f"Content-Length: {len(body)}", "Expect: 100-continue"])
    upload, req = c.request(head)
    cap.emit(req, c.respond(upload, interim(100)))
    cap.emit(c.extend(upload, body), c.respond(upload, h.ok(status=201)), c.ack(True))

    slow, req = c.request(request("GET", "/reports/slow", BOB))
    cap.emit(req, c.respond(slow, interim(102)))
    cap.wait(1.5)
    cap.emit(c.respond(slow, h.ok(items=10)), c.ack(True))

    app, req = c.request(request("GET", "/app", CAROL_NEW))
    hints = [interim(103, ["Link: </static/app.css>; rel=preload; as=style"]),
             interim(103, ["Link: </static/app.js>; rel=preload; as=script"])]
    cap.emit(req, c.respond(app, hints[0]), c.respond(app, hints[1]))
    cap.emit(c.respond(app, h.proxied(200, b"<html>" + b"x" * 500 + b"</html>", content_type="text/html")))
    cap.emit(c.ack(True), c.close())
    cap.pin(unanswered=0, parse_errors=0)


@fixture("no-body", """
    Responses without a body on one keep-alive connection (alice): HEAD answered 200 with
    Content-Length: 48213 and no body; DELETE answered 204 without Content-Length; GET with
    If-None-Match answered 304 carrying Content-Length: 812 and no body; PUT answered 204 with
    Content-Length: 0; then a GET answered 200 with a body, to show the framing held. Expected: 5
    events, unanswered 0, parse_errors 0.""")
def no_body(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    head_resp = h.proxied(200, headers=["ETag: \"r-2025\""]).replace(b"Content-Length: 0", b"Content-Length: 48213")
    cap.emit(c.roundtrip(request("HEAD", "/reports/2025", ALICE), head_resp)[1])
    cap.emit(c.roundtrip(request("DELETE", "/orders/55", ALICE), h.proxied(204, length=False))[1])
    not_modified = h.proxied(304, headers=['ETag: "o-56"']).replace(b"Content-Length: 0", b"Content-Length: 812")
    cap.emit(c.roundtrip(request("GET", "/orders/56", ALICE, headers=['If-None-Match: "o-56"']),
                         not_modified)[1])
    cap.emit(c.roundtrip(request("PUT", "/orders/57", ALICE, body=b'{"status":"paid"}'),
                         h.proxied(204))[1])
    cap.emit(c.roundtrip(request("GET", "/orders/58", ALICE), h.ok(items=3))[1], c.close())
    cap.pin(unanswered=0, parse_errors=0)


def ws_frame(rng: random.Random, payload: bytes, masked: bool, opcode: int = 1) -> bytes:
    header = bytes([0x80 | opcode])
    size = len(payload)
    lenbyte = (0x80 if masked else 0)
    header += bytes([lenbyte | size]) if size < 126 else bytes([lenbyte | 126]) + size.to_bytes(2, "big")
    if not masked:
        return header + payload
    mask = rng.randbytes(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@fixture("upgrade", """
    Conn 1: alice GET /ws/orders with `Connection: Upgrade`, `Upgrade: websocket`, answered 101
    Switching Protocols, then WebSocket frames both ways (a server text frame holds the text of an HTTP
    request and response): billed once with status 101, response_size = the 101 head only; nothing
    after it is HTTP. Conn 2: bob `CONNECT api.upstream.test:443` answered `200 Connection
    Established`, then TLS-looking bytes both ways: one request, and nothing after it is HTTP; its target
    is no path, so none of kong.yaml's routes matches it: not billed, counted no_route (Kong's router
    would answer it 404). Expected: 1 event, parse_errors 0, unanswered 0, no_route 1.""")
def upgrade(cap: Capture) -> None:
    rng = cap.rng
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    ws_key = base64.b64encode(rng.randbytes(16)).decode()
    accept = base64.b64encode(hashlib.sha1((ws_key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    ws, req = c.request(request("GET", "/ws/orders", ALICE, headers=[
        "Connection: Upgrade", "Upgrade: websocket", f"Sec-WebSocket-Key: {ws_key}",
        "Sec-WebSocket-Version: 13"]))
    switch = ("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
              f"Sec-WebSocket-Accept: {accept.decode()}\r\nDate: {DATE}\r\nVia: 1.1 {KONG}\r\n"
              f"X-Kong-Upstream-Latency: 3\r\nX-Kong-Proxy-Latency: 0\r\n"
              f"X-Kong-Request-Id: {cap.http.request_id()}\r\n\r\n").encode()
    cap.emit(req, c.respond(ws, switch))
    cap.emit(c.client(ws_frame(rng, b'{"subscribe":"orders"}', masked=True)), c.ack(False))
    trap = b"GET /orders HTTP/1.1\r\nHost: x\r\napikey: " + BOB.encode() + b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
    cap.emit(c.server(ws_frame(rng, trap, masked=False)), c.ack(True))
    cap.emit(c.server(ws_frame(rng, rng.randbytes(3000), masked=False, opcode=2)), c.ack(True))
    cap.emit(c.client(ws_frame(rng, b"\x03\xe8", masked=True, opcode=8)),
             c.server(ws_frame(rng, b"\x03\xe8", masked=False, opcode=8)), c.close(by_client=False))

    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    tunnel, req = c.request(request("CONNECT", "api.upstream.test:443", BOB, host="api.upstream.test:443"))
    cap.emit(req, c.respond(tunnel, b"HTTP/1.1 200 Connection Established\r\n\r\n"))
    hello = b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03" + rng.randbytes(238)
    cap.emit(c.client(hello), c.server(b"\x16\x03\x03\x00\x7a\x02" + rng.randbytes(121)
                                       + b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x0b\xb8" + rng.randbytes(3000)))
    cap.emit(c.client(b"\x17\x03\x03\x00\x40" + rng.randbytes(64)), c.ack(False), c.close())
    cap.pin(parse_errors=0, unanswered=0)


@fixture("header-case", """
    Key and framing headers in odd forms, one keep-alive connection. `APIKEY: <bob>`; a POST with
    `Content-LENGTH:` and `apikey:` whose value has tabs/spaces around it (carol old key); a POST with
    `TRANSFER-ENCODING: Chunked`; `?page=2&apikey=<alice>&sort=desc` (uri /orders?page=2&sort=desc);
    `?q=a%20b&apikey=alice%2Dkey%2D7f3a9c` (the key percent-encoded, decodes to alice's key; uri
    /search?q=a%20b); `?apikey=<machine-42>` alone (uri /orders); `?ApiKey=<bob>` which does NOT match
    (query names are case-sensitive) and which the gateway answers 401 "No API key found".
    Expected: 6 events, rejected 1.""")
def header_case(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    body = b'{"sku":"A-1","qty":2}'
    odd = [
        request("GET", "/orders", BOB, key_header="APIKEY"),
        request("POST", "/orders", headers=["Content-Type: application/json",
                                            f"Content-LENGTH: {len(body)}",
                                            f"apikey:\t {CAROL_OLD} \t"]) + body,
        request("POST", "/orders", CAROL_NEW, headers=["TRANSFER-ENCODING: Chunked"])
        + chunked([(body, "")], []),
        request("GET", f"/orders?page=2&apikey={ALICE}&sort=desc"),
        request("GET", "/search?q=a%20b&apikey=alice%2Dkey%2D7f3a9c"),
        request("GET", f"/orders?apikey={M42}"),
        request("GET", f"/orders?ApiKey={BOB}"),
    ]
    assert key_of(odd[4]) == ALICE and key_of(odd[6]) is None
    for index, req in enumerate(odd):
        resp = h.unauthorized(missing=True) if index == 6 else h.ok(items=index + 1)
        cap.emit(c.roundtrip(req, resp)[1])
    cap.emit(c.close())


@fixture("malformed", """
    Malformed requests, each answered by the gateway with a 400 and Connection: close. Conn 1: a valid
    bob GET (billed), then binary garbage (a TLS ClientHello) where the next request line should be.
    Conn 2: a request with a header line that has spaces and no colon (it also carries alice's key;
    nginx ignores a colon-less line of name characters alone, but rejects this one). Conn 3: a
    POST with `Content-Length: 99999999999999999999999` (alice's key). Conn 4: a valid alice GET
    (billed). Expected: 2 events, parse_errors 3 (one per malformed request; the gateway's 400 answers
    to them are not counted again and not billed), rejected 0.""")
def malformed(cap: Capture) -> None:
    h, rng = cap.http, cap.rng

    def bad_request(c: Conn) -> list[Frame]:
        return c.server(h.generated(400, "Bad request", connection="close")) + [c.fin(False), c.ack(True)]

    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake(), c.roundtrip(request("GET", "/orders", BOB), h.ok())[1])
    garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(300)
    cap.emit(c.client(garbage), bad_request(c), c.fin(True), c.ack(False))

    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake(), c.client(request("GET", "/orders", ALICE, headers=["X Broken Header No Colon"])))
    cap.emit(bad_request(c), c.fin(True), c.ack(False))

    c = cap.conn(client_ip(cap))
    absurd = request("POST", "/orders", ALICE, headers=[
        "Content-Type: application/json", "Content-Length: 99999999999999999999999"]) + b'{"a":1}'
    cap.emit(c.handshake(), c.client(absurd), bad_request(c), c.fin(True), c.ack(False))

    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake(), c.roundtrip(request("GET", "/orders/1", ALICE), h.ok())[1], c.close())
    cap.pin(parse_errors=3)


def small_exchange(cap: Capture, client: str) -> None:
    """The exchange every link-type fixture carries: alice GET (header key), bob POST (query key).
    Its HTTP bytes come from one shared seed, so every link type yields the very same events."""
    h = Http(random.Random(2026))
    c = cap.conn(client, 50000)
    cap.emit(c.handshake())
    cap.emit(c.roundtrip(request("GET", "/orders?page=2", ALICE), h.ok(items=3))[1])
    cap.emit(c.roundtrip(request("POST", f"/orders?apikey={BOB}", body=b'{"sku":"A-1","qty":2}'),
                         h.ok(items=1, status=201))[1])
    cap.emit(c.close())
    cap.pin(corrupt_packets=0, gaps=0)


SMALL = ("alice GET /orders?page=2 (key in a header, 200) and bob POST /orders (key in the query, 201) "
         "on one connection. Expected: 2 events, corrupt_packets 0, gaps 0.")
LINK_FIXTURES = [
    ("link-vlan", "vlan", "pcap", "Ethernet with one 802.1Q VLAN tag (VLAN 100)."),
    ("link-qinq", "qinq", "pcap", "Ethernet with QinQ: an 802.1ad tag (0x88a8, VLAN 200) over an 802.1Q tag."),
    ("link-sll", "sll", "pcap", "Linux cooked capture v1 (SLL, DLT 113)."),
    ("link-sll2", "sll2", "pcap", "Linux cooked capture v2 (SLL2, DLT 276)."),
    ("link-raw", "raw", "pcap", "Raw IP, no link header (LINKTYPE_RAW 101)."),
    ("link-null", "null", "pcap", "BSD loopback / NULL (DLT 0), 4-byte host-order family 2."),
    ("link-ipv6", "ether", "pcap", "IPv6 over Ethernet (2001:db8:: documentation addresses)."),
    ("pcapng", "ether", "pcapng", "Ethernet in a pcapng file (one SHB, one IDB, EPBs)."),
    ("gzip", "ether", "pcap.gz", "Ethernet in a gzip-compressed pcap file (.pcap.gz)."),
]
for name, link, container, what in LINK_FIXTURES:
    client = "2001:db8::1:5" if name == "link-ipv6" else "192.0.2.15"
    fixture(name, f"{what} {SMALL}", link=link, container=container)(
        lambda cap, client=client: small_exchange(cap, client))


@fixture("corrupt", """
    Corrupt and foreign packets around a good connection (alice GET, bob GET, both billed). Cut short
    when captured, 3 (each record holds less than the frame on the wire): a frame cut inside the
    Ethernet header (10 of 74 bytes captured), one cut inside the IPv4 header, one cut inside the TCP
    header. Corrupt, 2: an IPv4 header with IHL 3, a TCP header with data offset 3 (both to port 8000,
    carrying a request with alice's key that must not be billed). Not corrupt, ignored: a UDP DNS
    query, an ARP request, and a full HTTP exchange on port 9000 (gateway to upstream, with alice's
    key). Every gateway-to-client packet on the good connection has a wrong TCP checksum, as captures
    of locally sent packets show under checksum offload: they must be accepted. Expected: 2 events,
    cut_short_packets 3, corrupt_packets 2, each named in a warning, exit status 3 (packets were lost).""")
def corrupt(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    ether = LINKS["ether"][1]

    def bad_checksums(frames: list[Frame]) -> list[Frame]:
        for frame in frames:
            if not frame.from_client:
                correct = IP(bytes(frame.pkt))[TCP].chksum
                frame.pkt[TCP].chksum = (correct + 0x1111) & 0xFFFF
        return frames

    cap.emit(bad_checksums(c.handshake()))
    first = bytes(ether(c.ack(True), 0))
    cap.emit_bytes(first[:10], wirelen=len(first))
    cap.emit(bad_checksums(c.roundtrip(request("GET", "/orders?page=1", ALICE), h.ok())[1]))
    cap.emit_bytes(first[:14 + 12], wirelen=len(first))

    trap = request("GET", "/orders/evil", ALICE)
    bad_ihl = bytearray(bytes(Ether(src=ROUTER_MAC, dst=GATEWAY_MAC) / IP(src="10.9.9.9", dst=GATEWAY_V4)
                              / TCP(sport=40000, dport=GATEWAY_PORT, flags="PA", seq=1, ack=1) / trap))
    bad_ihl[14] = 0x43
    cap.emit_bytes(bytes(bad_ihl))
    bad_doff = bytearray(bytes(Ether(src=ROUTER_MAC, dst=GATEWAY_MAC) / IP(src="10.9.9.8", dst=GATEWAY_V4)
                               / TCP(sport=40001, dport=GATEWAY_PORT, flags="PA", seq=1, ack=1) / trap))
    bad_doff[14 + 20 + 12] = 0x30
    cap.emit_bytes(bytes(bad_doff))
    cap.emit_bytes(bytes(Ether(src=GATEWAY_MAC, dst=ROUTER_MAC) / IP(src=GATEWAY_V4, dst="10.0.0.53")
                         / UDP(sport=53124, dport=53) / DNS(id=0x1A2B, rd=1, qd=DNSQR(qname=HOST))))
    cap.emit_bytes(bytes(Ether(src=GATEWAY_MAC, dst="ff:ff:ff:ff:ff:ff")
                         / ARP(op=1, hwsrc=GATEWAY_MAC, psrc=GATEWAY_V4, pdst="10.0.0.1")))

    upstream = cap.conn(GATEWAY_V4, server="10.0.0.20", sport=9000)
    cap.emit(upstream.handshake(), upstream.roundtrip(request("GET", "/orders/2", ALICE), h.ok())[1])
    cut_tcp = bytes(ether(c.ack(True), 0))
    cap.emit_bytes(cut_tcp[:14 + 20 + 10], wirelen=len(cut_tcp))
    cap.emit(bad_checksums(c.roundtrip(request("GET", "/orders/2", BOB), h.ok(items=4))[1]))
    cap.emit(bad_checksums(c.close()), upstream.close())
    cap.pin(corrupt_packets=2, cut_short_packets=3)
    cap.exit_status = 3


@fixture("timeout", """
    A request with no response: alice GET /reports/slow on conn 1, which then stays silent and open.
    Meanwhile conn 2 (bob) makes 8 requests, one every 10 s, so the capture runs 85 s past the
    unanswered request. After the 60 s response timeout alice's request is emitted with status 0 and
    response_size 0. Expected: 9 events (alice's first, by request time), unanswered 1.""")
def timeout(cap: Capture) -> None:
    h = cap.http
    slow = cap.conn(client_ip(cap))
    busy = cap.conn(client_ip(cap))
    cap.emit(slow.handshake(), busy.handshake())
    _, req = slow.request(request("GET", "/reports/slow", ALICE))
    cap.emit(req, slow.ack(False))
    for n in range(8):
        cap.wait(10.0)
        cap.emit(busy.roundtrip(request("GET", f"/orders?page={n + 1}", BOB), h.ok())[1])
    cap.wait(5.0)
    cap.emit(busy.close())


@fixture("status-codes", """
    Billing by status. Conn 1 (alice): 200, 429 made by Kong's rate limiting, 500 from the upstream:
    all three billed. Conn 2: carol's OLD key, which the credential table knows but the gateway answers
    401 (revoked there): not billed, rejected. Conn 3: a key unknown to the table that the gateway
    answers 200 (created after the table was synced), and a request without any key answered 200 (a
    route without key-auth): not billed, unresolved. Expected: 3 events, rejected 1, unresolved 2.""")
def status_codes(cap: Capture) -> None:
    h = cap.http
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake())
    cap.emit(c.roundtrip(request("GET", "/orders", ALICE), h.ok())[1])
    limited = h.generated(429, "API rate limit exceeded", [
        "Retry-After: 1", "RateLimit-Limit: 5", "RateLimit-Remaining: 0", "RateLimit-Reset: 1",
        "X-RateLimit-Limit-Second: 5", "X-RateLimit-Remaining-Second: 0"])
    cap.emit(c.roundtrip(request("GET", "/orders", ALICE), limited)[1])
    cap.emit(c.roundtrip(request("POST", "/orders", ALICE, body=b'{"sku":"B-2"}'),
                         h.proxied(500, b'{"error":"database unavailable"}'))[1], c.close())
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake(), c.roundtrip(request("GET", "/orders", CAROL_OLD), h.unauthorized())[1], c.close())
    c = cap.conn(client_ip(cap))
    cap.emit(c.handshake(), c.roundtrip(request("GET", "/orders", "dave-key-created-later"), h.ok())[1])
    cap.emit(c.roundtrip(request("GET", "/health"), h.proxied(200, b'{"status":"ok"}'))[1], c.close())


# ----------------------------------------------------------------------------------------- main


def build(spec: Fixture, subjects: dict[str, str], out: Path) -> tuple[Path, dict]:
    cap = Capture(spec.name, spec.link, subjects)
    spec.build(cap)
    capture = out / f"crafted-{spec.name}.{spec.container}"
    if spec.container == "pcapng":
        cap.write_pcapng(capture)
    elif spec.container == "pcap.gz":
        capture.write_bytes(gzip.compress(cap.pcap_bytes(), compresslevel=9, mtime=0))
    else:
        capture.write_bytes(cap.pcap_bytes())
    truth = cap.truth(spec.description, capture.name)
    (out / f"crafted-{spec.name}.truth.json").write_text(dump_truth(truth))
    return capture, truth


def dump_truth(truth: dict) -> str:
    """Indented, but one line per event so large fixtures stay readable and diffs stay small."""
    lines = ["{"]
    for key, value in truth.items():
        if key == "events":
            lines.append('  "events": [' + ("" if value else "],"))
            for index, event in enumerate(value):
                lines.append("    " + json.dumps(event) + ("," if index < len(value) - 1 else ""))
            if value:
                lines.append("  ],")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines + ["}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"fixtures to build (default all): {', '.join(FIXTURES)}")
    parser.add_argument("--out", type=Path, default=CAPTURES, help="output folder (default captures/)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FIXTURES]
    if unknown:
        parser.error(f"unknown fixture(s): {', '.join(unknown)}")
    subjects = load_subjects(CAPTURES / "kong.yaml")
    missing = [k for k in KNOWN_KEYS if k not in subjects]
    if missing or UNKNOWN in subjects:
        print("captures/kong.yaml no longer has the keys this script crafts with", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or FIXTURES:
        capture, truth = build(FIXTURES[name], subjects, args.out)
        print(f"{capture.name}: {len(truth['events'])} events, counters {truth['counters']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
