"""Peak memory on a hostile flood, and that the legitimate traffic inside it is still metered exactly.

Crafts the flood the issue describes: 100,000 half-open requests (a handshake and a head that never
ends), one 8 MB header line, and 200 legitimate keep-alive exchanges (alice's and bob's keys, in the
header and in the query) interleaved with them. Then replays it, side by side with tshark on the same
file, with the default flags (nobody sizes anything):

    agent --read flood.pcap --port 8000 --credentials captures/kong.yaml --output events.jsonl

Checks the 200 events one for one (subject, uri, status) and prints the peak RSS of both. Exits non-zero
if an event is missing, extra or wrong, or if the agent peaks above --max-mb (default 150).

    python scripts/bench_memory.py [--half-open 100000] [--max-mb 150] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replay import timed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PORT = 8000
SERVER = bytes([127, 0, 0, 1])
KEYS = {"alice": "alice-key-7f3a9c", "bob": "bob-key-41d2e8"}
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
SEGMENT = 1400  # payload bytes per crafted segment


class PcapWriter:
    """Raw-IPv4 (DLT_RAW) records, written without a per-packet library call: 300k packets in seconds."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")
        self.file.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 101))
        self.time = 1_700_000_000.0

    def segment(self, client: bytes, client_port: int, to_server: bool, seq: int, ack: int, flags: int,
                payload: bytes = b"") -> None:
        source, destination = (client, SERVER) if to_server else (SERVER, client)
        sport, dport = (client_port, PORT) if to_server else (PORT, client_port)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags, 65535, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0, source,
                         destination)
        packet = ip + tcp + payload
        self.time += 0.00001
        seconds = int(self.time)
        self.file.write(struct.pack("<IIII", seconds, int((self.time - seconds) * 1e6), len(packet), len(packet)))
        self.file.write(packet)

    def close(self) -> None:
        self.file.close()


def client_address(index: int) -> bytes:
    return bytes([10, (index >> 16) & 0xFF, (index >> 8) & 0xFF, index & 0xFF])


def half_open(writer: PcapWriter, index: int, padding: int) -> None:
    """A handshake and the start of a head that never ends: the state a slowloris flood leaves behind."""
    client, port = client_address(index), 20000 + index % 40000
    writer.segment(client, port, True, 1000, 0, SYN)
    writer.segment(client, port, False, 9000, 1001, SYN | ACK)
    head = b"GET /flood/%d HTTP/1.1\r\nHost: api.example.com\r\nX-Padding: %s" % (index, b"p" * padding)
    writer.segment(client, port, True, 1001, 9001, ACK | PSH, head)


def long_header_line(writer: PcapWriter, size: int) -> None:
    client, port = bytes([10, 200, 0, 1]), 4444
    writer.segment(client, port, True, 1000, 0, SYN)
    writer.segment(client, port, False, 9000, 1001, SYN | ACK)
    sequence = 1001
    chunk = b"GET /big HTTP/1.1\r\nX-Long: "
    while sequence - 1001 < size:
        writer.segment(client, port, True, sequence, 9001, ACK, chunk)
        sequence += len(chunk)
        chunk = b"L" * SEGMENT


def legitimate(writer: PcapWriter, index: int) -> dict:
    """One whole keep-alive exchange with a known key, and the event it must give."""
    client, port = bytes([10, 250, index >> 8, index & 0xFF]), 50000 + index
    subject = "alice" if index % 2 else "bob"
    key = KEYS[subject]
    if index % 3:
        uri = f"/orders/{index}"
        request = f"GET {uri} HTTP/1.1\r\nHost: api.example.com\r\napikey: {key}\r\n\r\n".encode()
    else:
        uri = f"/orders/{index}?page=2"
        request = f"GET /orders/{index}?apikey={key}&page=2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n".encode()
    body = b'{"ok":true}'
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Kong-Upstream-Latency: 1\r\n\r\n%s" % (len(body), body)
    writer.segment(client, port, True, 1000, 0, SYN)
    writer.segment(client, port, False, 9000, 1001, SYN | ACK)
    writer.segment(client, port, True, 1001, 9001, ACK | PSH, request)
    writer.segment(client, port, False, 9001, 1001 + len(request), ACK | PSH, response)
    writer.segment(client, port, True, 1001 + len(request), 9001 + len(response), ACK | FIN)
    writer.segment(client, port, False, 9001 + len(response), 1002 + len(request), ACK | FIN)
    return {"subject": subject, "uri": uri, "status": 200}


def craft(path: Path, half_opens: int, legitimate_count: int, header_bytes: int, padding: int = 300) -> list[dict]:
    """Writes the flood; returns the events its legitimate exchanges must give."""
    writer = PcapWriter(path)
    expected = []
    every = max(1, half_opens // legitimate_count)
    for index in range(half_opens):
        half_open(writer, index, padding)
        if index % every == 0 and len(expected) < legitimate_count:
            expected.append(legitimate(writer, len(expected)))
        if index == half_opens // 2:
            long_header_line(writer, header_bytes)
    while len(expected) < legitimate_count:
        expected.append(legitimate(writer, len(expected)))
    writer.close()
    return expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half-open", type=int, default=100_000)
    parser.add_argument("--legitimate", type=int, default=200)
    parser.add_argument("--header-mb", type=int, default=8)
    parser.add_argument("--max-mb", type=float, default=150.0, help="fail above this peak RSS (default 150)")
    parser.add_argument("--keep", type=Path, help="keep the capture and events in this directory")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        capture = directory / "flood.pcap"
        expected = craft(capture, args.half_open, args.legitimate, args.header_mb << 20)
        events_file = directory / "events.jsonl"
        agent = [sys.executable, "-m", "agent", "--read", str(capture), "--port", str(PORT),
                 "--credentials", str(REPO / "captures" / "kong.yaml"), "--output", str(events_file)]
        elapsed, peak, stderr = timed(agent, None)
        tshark_elapsed, tshark_peak, _ = timed(["tshark", "-r", str(capture), "-Y", "http.request", "-T", "fields",
                                                "-e", "http.request.uri"], open(directory / "tshark.out", "w"))
        events = [json.loads(line) for line in events_file.read_text().splitlines()]
        got = sorted((e["subject"], e["data"]["request_uri"], e["data"]["response_http_status"]) for e in events)
        want = sorted((e["subject"], e["uri"], e["status"]) for e in expected)
        summary = next((line for line in stderr.splitlines() if line.startswith("summary:")), "")
        print(f"flood: {capture.stat().st_size / (1 << 20):.0f} MiB capture, {args.half_open} half-open requests,"
              f" one {args.header_mb} MB header line, {args.legitimate} legitimate exchanges")
        print(f"agent:  {elapsed:6.2f} s, peak RSS {peak:6.1f} MiB (limit {args.max_mb:g})")
        print(f"tshark: {tshark_elapsed:6.2f} s, peak RSS {tshark_peak:6.1f} MiB")
        print(summary)
        failures = []
        if got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            failures.append(f"events not exact: {len(got)} for {len(want)} expected; missing {missing[:3]},"
                            f" extra {extra[:3]}")
        if peak > args.max_mb:
            failures.append(f"peak RSS {peak:.1f} MiB is above {args.max_mb:g} MiB")
        for failure in failures:
            print(f"FAIL: {failure}")
        if not failures:
            print(f"ok: the {len(want)} legitimate exchanges metered exactly within {args.max_mb:g} MiB")
        return 1 if failures else 0
    finally:
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
