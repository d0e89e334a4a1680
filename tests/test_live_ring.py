"""The TPACKET_V3 ring with real loopback traffic: whole super-frames, fanout by flow, a socket taken over
by a new reader without losing or repeating what was captured, and the kernel's drop counter when the ring
is full. Needs root."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict

import pytest

from agent._core import DLT_EN10MB, FrameDecoder
from agent.live import startup_checks
from agent.live.ring_store import RingStore, open_rings, ring_names
from agent.live.startup_checks import Link, LiveCaptureError
from agent.source.kernel_filter import capture_filter
from agent.source.packet_ring import BLOCK_BYTES, PACKET_FANOUT, PACKET_IGNORE_OUTGOING, SOL_PACKET, PacketRing

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packet sockets")]


def open_ring(port: int, ring_bytes: int = 64 << 20) -> PacketRing:
    return PacketRing("lo", DLT_EN10MB, capture_filter([port], 14, drop_outgoing=True), ring_bytes,
                      ignore_outgoing=True)


def socket_option(ring: PacketRing, option: int) -> int:
    """One of the ring's socket's SOL_PACKET options, as the kernel has it (PACKET_FANOUT: 0 alone, never 0
    in a group, whose id may be)."""
    sock = socket.socket(fileno=os.dup(ring.fileno()))
    try:
        return sock.getsockopt(SOL_PACKET, option)
    finally:
        sock.close()


def read_until_quiet(ring: PacketRing, quiet: float = 0.3, limit: float = 10.0) -> list[tuple[float, int, bytes]]:
    """Every frame the ring hands over until none has come for `quiet` seconds (blocks retire in ms)."""
    frames: list[tuple[float, int, bytes]] = []
    deadline = time.monotonic() + limit
    last = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < quiet:
        block = ring.next_block()
        if block is None:
            ring.wait(50)
            continue
        frames.extend(block)
        last = time.monotonic()
    return frames


class Server:
    """A loopback server that reads each connection to its end and answers with `reply` bytes."""

    def __init__(self, reply: bytes = b"done") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.received: dict[int, int] = {}
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, (_, client_port) = self.sock.accept()
            except OSError:
                return
            with connection:
                total = 0
                while chunk := connection.recv(1 << 20):
                    total += len(chunk)
                connection.sendall(self.reply)
                self.received[client_port] = total

    def send(self, data: bytes) -> int:
        """One connection: send `data`, half-close, read the reply; returns the client's port."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as client:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
            assert reply == self.reply
            return client.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def payloads(frames: list[tuple[float, int, bytes]], port: int) -> dict[tuple[int, bool], bytes]:
    """(client port, to server) -> the bytes of that stream, placed by sequence number (loopback TCP does
    retransmit now and then under load; a retransmitted segment is a packet of its own, not a copy)."""
    decoder = FrameDecoder()
    streams: dict[tuple[int, bool], bytearray] = defaultdict(bytearray)
    starts: dict[tuple[int, bool], int] = {}
    for _, linktype, frame in frames:
        segment = decoder.decode(linktype, frame)
        if segment is None or not segment[7]:
            continue
        to_server = segment[3] == port
        key = (segment[1] if to_server else segment[3], to_server)
        offset = (segment[4] - starts.setdefault(key, segment[4])) & 0xFFFFFFFF
        stream = streams[key]
        if len(stream) < offset:
            stream.extend(b"\0" * (offset - len(stream)))  # a hole; the comparison shows it
        stream[offset : offset + len(segment[7])] = segment[7]
    return {key: bytes(stream) for key, stream in streams.items()}


def test_offloaded_super_frames_arrive_whole_and_each_packet_once() -> None:
    server = Server()
    ring = open_ring(server.port)
    data = os.urandom(8 << 20)
    try:
        before = time.time()
        client_port = server.send(data)
        after = time.time()
        frames = read_until_quiet(ring)
        ring.read_statistics()
    finally:
        ring.close()
        server.close()
    assert payloads(frames, server.port)[(client_port, True)] == data
    assert len({frame for _, _, frame in frames}) == len(frames)  # no packet twice (lo's outgoing copy)
    assert max(len(frame) for _, _, frame in frames) > 16384  # super-frames, not MTU-sized pieces
    assert ring.truncated == 0
    assert ring.statistics.drops == 0 and ring.statistics.packets == len(frames)
    assert all(before - 1 <= timestamp <= after + 1 for timestamp, _, _ in frames)


def test_a_ring_alone_joins_no_fanout_group_and_the_kernel_skips_loopbacks_outgoing_copies() -> None:
    """A fanout group's demultiplexing runs on every packet of the interface and costs the gateway CPU per
    request (scripts/bench_tls.py): one ring does without it, and the outgoing copies are not even cloned."""
    ring = open_ring(80, ring_bytes=4 * BLOCK_BYTES)
    try:
        in_group, skips_outgoing = socket_option(ring, PACKET_FANOUT), socket_option(ring, PACKET_IGNORE_OUTGOING)
    finally:
        ring.close()
    assert (in_group, skips_outgoing) == (0, 1)
    assert (ring.fanout_group, ring.ignores_outgoing) == (0, True)


def test_fanout_keeps_each_connection_in_one_ring_and_misses_none() -> None:
    server = Server(reply=b"HTTP/1.1 200 OK\r\n\r\n")
    first, second = open_rings(Link("lo", DLT_EN10MB, 14, True), capture_filter([server.port], 14, drop_outgoing=True),
                               64 << 20, 2)
    assert socket_option(first, PACKET_FANOUT) and socket_option(second, PACKET_FANOUT)
    assert first.fanout_group == second.fanout_group
    try:
        client_ports = [server.send(b"GET /%d HTTP/1.1\r\n\r\n" % n) for n in range(24)]
        seen = [payloads(read_until_quiet(ring), server.port) for ring in (first, second)]
    finally:
        first.close()
        second.close()
        server.close()
    for client_port in client_ports:
        holders = [index for index, streams in enumerate(seen) if (client_port, True) in streams]
        assert len(holders) == 1, client_port  # request and response in the same ring
        assert (client_port, False) in seen[holders[0]]
    assert all(seen), "the flow hash sent every connection to one ring"


def test_rings_opened_while_connections_run_keep_each_connection_in_one_ring() -> None:
    """A fanout group spreads the flows over the sockets it has, and they move as each socket joins: rings
    that took packets before the last joined had a connection's request in one ring and its response in
    the other (a request billed unanswered and a response unmatched, at a start with --workers 2)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    running = threading.Event()
    running.set()

    def echo(connection: socket.socket) -> None:
        with connection:
            while chunk := connection.recv(4096):
                connection.sendall(chunk)

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(connection,), daemon=True).start()

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            while running.is_set():
                connection.sendall(b"ping")
                connection.recv(4096)

    threading.Thread(target=accept, daemon=True).start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(16)]
    for thread in clients:
        thread.start()
    time.sleep(0.2)  # every connection under way when the rings open
    rings = open_rings(Link("lo", DLT_EN10MB, 14, True), capture_filter([port], 14, drop_outgoing=True),
                       16 * BLOCK_BYTES, 2)
    try:
        time.sleep(0.5)
        running.clear()
        for thread in clients:
            thread.join(timeout=10)
        seen = [{key[0] for key in payloads(read_until_quiet(ring), port)} for ring in rings]
    finally:
        for ring in rings:
            ring.close()
        listener.close()
    assert len(seen[0] | seen[1]) == len(clients), seen
    assert not seen[0] & seen[1], "a connection's packets went to both rings"


def test_a_socket_taken_over_is_read_on_from_where_its_previous_reader_stopped() -> None:
    """What a service manager's store does across a restart: the socket outlives its reader, the kernel
    fills its ring meanwhile, and a new reader starts at the first block the old one did not read."""
    server = Server()
    program = capture_filter([server.port], 14, drop_outgoing=True)
    first = open_ring(server.port, ring_bytes=8 * BLOCK_BYTES)
    taken = None
    try:
        read_before = server.send(b"read by the first reader")
        seen_first = payloads(read_until_quiet(first), server.port)
        left = [server.send(b"left for the next reader %d" % number) for number in range(3)]
        time.sleep(0.3)  # handed over by the kernel, not read
        kept = os.dup(first.fileno())
        first.close()  # the reader is gone; the kept descriptor holds the socket, and its ring
        taken = PacketRing("lo", DLT_EN10MB, program, 8 * BLOCK_BYTES, inherited=kept)
        after = server.send(b"captured after the take-over")
        seen_next = payloads(read_until_quiet(taken), server.port)
    finally:
        first.close()
        if taken is not None:
            taken.close()
        server.close()
    assert seen_first[(read_before, True)] == b"read by the first reader"
    assert (read_before, True) not in seen_next
    for number, client_port in enumerate(left):
        assert seen_next[(client_port, True)] == b"left for the next reader %d" % number
    assert seen_next[(after, True)] == b"captured after the take-over"
    assert taken.fanout_group == first.fanout_group and taken.ignores_outgoing


def test_a_descriptor_that_is_not_a_packet_ring_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        with pytest.raises(OSError, match="not a packet socket"):
            PacketRing("lo", DLT_EN10MB, capture_filter([80], 14, drop_outgoing=True), 8 * BLOCK_BYTES, inherited=os.dup(other.fileno()))
    plain = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # no ring: mapping it fails
    with pytest.raises(OSError):
        PacketRing("lo", DLT_EN10MB, capture_filter([80], 14, drop_outgoing=True), 8 * BLOCK_BYTES, inherited=plain.detach())


def test_a_full_ring_is_seen_as_full_and_its_drops_are_counted() -> None:
    server = Server()
    ring = open_ring(server.port, ring_bytes=4 * BLOCK_BYTES)
    try:
        assert ring.ready_fraction() == 0
        server.send(os.urandom(16 << 20))  # four times what the ring holds, and nobody reading
        time.sleep(0.1)
        assert ring.ready_fraction() == 1
        dropped = ring.read_statistics().drops
        frames = read_until_quiet(ring)
        assert ring.ready_fraction() == 0
    finally:
        ring.close()
        server.close()
    assert dropped > 0
    assert ring.statistics.packets == len(frames) + ring.statistics.drops


def test_a_ring_taken_over_is_not_counted_again_against_the_memory_available(monkeypatch) -> None:
    """A ring is kernel memory from its first start on. Taken over at a restart, it is not allocated again:
    counted against what is left, it would refuse the restart of a run the check let start (a restart loop
    under Restart=on-failure); a new one is still checked."""
    link, ring_bytes = Link("lo", DLT_EN10MB, 14, True), 8 * BLOCK_BYTES
    [name] = ring_names(link, ring_bytes, 1)
    left_after_the_first_start = ring_bytes * 3 // 2  # room for the ring the first start made, not for two
    monkeypatch.setattr(startup_checks.psutil, "virtual_memory",
                        lambda: type("Memory", (), {"available": left_after_the_first_start}))
    program = capture_filter([80], 14, drop_outgoing=True)
    kept = open_ring(80, ring_bytes)
    try:
        [taken] = RingStore(None, {name: [os.dup(kept.fileno())]}).open(link, program, ring_bytes, 1)
        assert taken.taken_over
        taken.close()
        with pytest.raises(LiveCaptureError, match="more than half the memory available"):
            RingStore(None, {}).open(link, program, ring_bytes, 1)
    finally:
        kept.close()
