"""TCP reassembly on its own: `Segment` tuples in, ordered stream events per connection and direction out.

Each test plays a small conversation by hand (sequence and acknowledgement numbers included) and checks
the byte streams and counters a user would compare against what the client and server really sent.

The core's test surface returns events with the connection's id where the Python stage put its
`Connection`; the `TcpReassembler` below wraps it so that the events carry a `Connection` view again
(the same object for the same id, looked up among the core's open connections) and the counters read
as attributes: the tests themselves are the Python stage's, unchanged.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import pytest

from agent import _core
from agent._core import CLOSED, DATA, END, GAP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN


@dataclass
class ReassemblyLimits:
    max_connections: int = 100_000
    max_pending_bytes_per_stream: int = 1 << 20
    idle_timeout: float = 300.0


class Connection:
    """What an event tells of its connection, refreshed from the core after every call."""

    def __init__(self, connection_id: int) -> None:
        self.id = connection_id
        self.client_port: int | None = None
        self.saw_syn = False
        self.to_server = SimpleNamespace(pending_bytes=0)
        self.to_client = SimpleNamespace(pending_bytes=0)


class TcpReassembler:
    def __init__(self, server_ports: set[int], limits: ReassemblyLimits | None = None) -> None:
        self.core = _core.TcpReassembler(server_ports, **asdict(limits or ReassemblyLimits()))
        self.connections: dict[int, Connection] = {}

    def __len__(self) -> int:
        return len(self.core)

    @property
    def counters(self) -> SimpleNamespace:
        return SimpleNamespace(**self.core.counters)

    def feed(self, time: float, segment: tuple) -> list[tuple]:
        return self._with_connections(self.core.feed(time, segment))

    def expire(self, now: float) -> list[tuple]:
        return self._with_connections(self.core.expire(now))

    def close_all(self, now: float) -> list[tuple]:
        return self._with_connections(self.core.close_all(now))

    def _with_connections(self, events: list[tuple]) -> list[tuple]:
        for (connection_id, _, client_port, _, _, saw_syn, _, to_server_pending,
             to_client_pending) in self.core.connections():
            connection = self._connection(connection_id)
            connection.client_port, connection.saw_syn = client_port, saw_syn
            connection.to_server.pending_bytes = to_server_pending
            connection.to_client.pending_bytes = to_client_pending
        return [(kind, self._connection(connection_id), *rest) for kind, connection_id, *rest in events]

    def _connection(self, connection_id: int) -> Connection:
        return self.connections.setdefault(connection_id, Connection(connection_id))


CLIENT, SERVER = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
CLIENT_PORT, SERVER_PORT = 40000, 8000
PSH = 0x08
CLIENT_ISN, SERVER_ISN = 1000, 5000


class Conversation:
    """One connection driven by hand; `client_next`/`server_next` are the next sequence numbers to send."""

    def __init__(self, reassembler: TcpReassembler, client_port: int = CLIENT_PORT, client_isn: int = CLIENT_ISN,
                 server_isn: int = SERVER_ISN) -> None:
        self.reassembler = reassembler
        self.client_port = client_port
        self.client_isn, self.server_isn = client_isn, server_isn
        self.client_next = (client_isn + 1) & 0xFFFFFFFF
        self.server_next = (server_isn + 1) & 0xFFFFFFFF
        self.events: list[tuple] = []

    def from_client(self, seq: int, payload: bytes = b"", flags: int = TCP_ACK | PSH, ack: int | None = None,
                    time: float = 0.0) -> list[tuple]:
        segment = (CLIENT, self.client_port, SERVER, SERVER_PORT, seq & 0xFFFFFFFF,
                   (self.server_next if ack is None else ack) & 0xFFFFFFFF, flags, payload)
        return self._feed(time, segment)

    def from_server(self, seq: int, payload: bytes = b"", flags: int = TCP_ACK | PSH, ack: int | None = None,
                    time: float = 0.0) -> list[tuple]:
        segment = (SERVER, SERVER_PORT, CLIENT, self.client_port, seq & 0xFFFFFFFF,
                   (self.client_next if ack is None else ack) & 0xFFFFFFFF, flags, payload)
        return self._feed(time, segment)

    def _feed(self, time: float, segment: tuple) -> list[tuple]:
        events = self.reassembler.feed(time, segment)
        self.events += events
        return events

    def handshake(self, time: float = 0.0) -> list[tuple]:
        return (self.from_client(self.client_isn, flags=TCP_SYN, ack=0, time=time)
                + self.from_server(self.server_isn, flags=TCP_SYN | TCP_ACK, ack=self.client_next, time=time)
                + self.from_client(self.client_next, flags=TCP_ACK, time=time))

    def client_at(self, offset: int) -> int:
        """Sequence number of client stream byte `offset`."""
        return self.client_isn + 1 + offset

    def server_at(self, offset: int) -> int:
        return self.server_isn + 1 + offset


def new(limits: ReassemblyLimits | None = None, **conversation) -> tuple[TcpReassembler, Conversation]:
    reassembler = TcpReassembler({SERVER_PORT}, limits)
    return reassembler, Conversation(reassembler, **conversation)


def stream(events: list[tuple], to_server: bool = True) -> list[tuple]:
    """(kind, payload, position) of one direction's DATA and GAP events, in order."""
    return [(kind, payload, position) for kind, _, direction, _, payload, position, _ in events
            if kind in (DATA, GAP) and direction == to_server]


def received(events: list[tuple], to_server: bool = True) -> bytes:
    return b"".join(payload for kind, payload, _ in stream(events, to_server) if kind == DATA)


def kinds(events: list[tuple]) -> list[int]:
    return [event[0] for event in events]


def test_in_order_segments_are_delivered_with_their_positions():
    _, conversation = new()
    conversation.handshake()
    for offset, chunk in ((0, b"GET / HT"), (8, b"TP/1.1\r\n"), (16, b"\r\n")):
        conversation.from_client(conversation.client_at(offset), chunk)
    assert stream(conversation.events) == [(DATA, b"GET / HT", 0), (DATA, b"TP/1.1\r\n", 8), (DATA, b"\r\n", 16)]


CHUNKS = [(0, b"aaaa"), (4, b"bbbb"), (8, b"cccc"), (12, b"dd")]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_out_of_order_segments_are_delivered_in_sequence_order(order):
    reassembler, conversation = new()
    conversation.handshake()
    for index in order:
        offset, chunk = CHUNKS[index]
        conversation.from_client(conversation.client_at(offset), chunk)
    assert received(conversation.events) == b"aaaabbbbccccdd"
    positions = [position for _, _, position in stream(conversation.events)]
    assert positions == sorted(positions)
    assert reassembler.counters.gaps == 0


def test_held_back_segments_wait_for_the_hole():
    _, conversation = new()
    conversation.handshake()
    assert conversation.from_client(conversation.client_at(4), b"bbbb") == []
    delivered = conversation.from_client(conversation.client_at(0), b"aaaa")
    assert stream(delivered) == [(DATA, b"aaaa", 0), (DATA, b"bbbb", 4)]


def test_exact_duplicates_and_retransmissions_are_dropped_and_counted():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"hello ")
    conversation.from_client(conversation.client_at(6), b"world")
    assert conversation.from_client(conversation.client_at(0), b"hello ") == []
    assert conversation.from_client(conversation.client_at(2), b"llo") == []  # a retransmitted part
    assert conversation.from_client(conversation.client_at(0), b"hello world") == []  # repacketised
    assert received(conversation.events) == b"hello world"
    assert reassembler.counters.duplicate_segments == 3


def test_a_held_back_segment_seen_twice_is_delivered_once():
    _, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(5), b"world")
    conversation.from_client(conversation.client_at(5), b"world")
    conversation.from_client(conversation.client_at(0), b"hello")
    assert received(conversation.events) == b"helloworld"


def test_a_duplicate_of_a_held_back_segment_is_counted():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(5), b"world")
    conversation.from_client(conversation.client_at(5), b"world")
    conversation.from_client(conversation.client_at(0), b"hello")
    assert reassembler.counters.duplicate_segments == 1


def test_overlapping_retransmission_is_trimmed_to_the_new_bytes():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"0123456789")
    delivered = conversation.from_client(conversation.client_at(5), b"56789abcde")
    assert stream(delivered) == [(DATA, b"abcde", 10)]
    assert received(conversation.events) == b"0123456789abcde"
    assert reassembler.counters.duplicate_segments == 0


def test_overlapping_held_back_segments_are_stitched_without_repeating_bytes():
    _, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(10), b"abcdefghij")
    conversation.from_client(conversation.client_at(15), b"fghijKLMNO")
    conversation.from_client(conversation.client_at(0), b"0123456789")
    assert received(conversation.events) == b"0123456789abcdefghijKLMNO"


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
def test_sequence_numbers_wrapping_past_2_32(order):
    client_isn = 0xFFFFFFF0
    reassembler, conversation = new(client_isn=client_isn)
    conversation.handshake()
    chunks = [(0, b"A" * 10), (10, b"B" * 10), (20, b"C" * 10)]  # the second one crosses 2^32
    assert conversation.client_at(10) < 1 << 32 < conversation.client_at(20)
    for index in order:
        offset, chunk = chunks[index]
        conversation.from_client(conversation.client_at(offset), chunk)
    assert received(conversation.events) == b"A" * 10 + b"B" * 10 + b"C" * 10
    assert [position for _, _, position in stream(conversation.events)] == [0, 10, 20]
    # the server's ACK across the wrap acknowledges exactly what was sent: no gap
    conversation.from_server(conversation.server_at(0), b"HTTP/1.1 204 No Content\r\n\r\n",
                             ack=conversation.client_at(30))
    assert reassembler.counters.gaps == 0


def test_a_hole_becomes_a_gap_as_soon_as_the_peer_acknowledges_beyond_it():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"0123456789")
    conversation.from_client(conversation.client_at(20), b"KLMNOPQRST")  # bytes 10..19 never captured
    assert conversation.from_server(conversation.server_at(0), flags=TCP_ACK, ack=conversation.client_at(10)) == []
    declared = conversation.from_server(conversation.server_at(0), flags=TCP_ACK, ack=conversation.client_at(30))
    assert stream(declared) == [(GAP, 10, 10), (DATA, b"KLMNOPQRST", 20)]
    assert reassembler.counters.gaps == 1
    assert reassembler.counters.gap_bytes == 10


def test_bytes_acknowledged_but_never_seen_are_a_gap_at_the_end_of_the_stream():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"0123456789")
    declared = conversation.from_server(conversation.server_at(0), b"HTTP/1.1 200 OK\r\n",
                                        ack=conversation.client_at(25))
    assert stream(declared, to_server=True) == [(GAP, 15, 10)]
    assert received(declared, to_server=False) == b"HTTP/1.1 200 OK\r\n"
    assert reassembler.counters.gap_bytes == 15


def test_a_stream_without_syn_starts_at_its_first_segment_and_the_peer_at_the_acknowledged_byte():
    reassembler, conversation = new()
    first = conversation.from_client(777_777, b"GET /a HTTP/1.1\r\n\r\n", ack=999_999)
    assert stream(first) == [(DATA, b"GET /a HTTP/1.1\r\n\r\n", 0)]
    connection = first[0][1]
    assert not connection.saw_syn
    # the server's answer starts at the byte the client acknowledged; an older retransmitted part is trimmed
    answer = conversation.from_server(999_990, b"#########HTTP/1.1 200 OK\r\n", ack=777_777 + 19)
    assert stream(answer, to_server=False) == [(DATA, b"HTTP/1.1 200 OK\r\n", 0)]
    assert reassembler.counters.connections == 1 and reassembler.counters.gaps == 0


def test_server_data_seen_first_starts_the_client_stream_at_its_ack():
    _, conversation = new()
    conversation.from_server(50_000, b"HTTP/1.1 200 OK\r\n", ack=60_000)
    later = conversation.from_client(60_000, b"GET /next HTTP/1.1\r\n\r\n", ack=50_017)
    assert stream(later) == [(DATA, b"GET /next HTTP/1.1\r\n\r\n", 0)]


def test_fin_ends_a_direction_only_after_all_its_data():
    _, conversation = new()
    conversation.handshake()
    # the FIN overtakes the last data segment
    assert kinds(conversation.from_client(conversation.client_at(5), b"world", flags=TCP_ACK | TCP_FIN)) == []
    delivered = conversation.from_client(conversation.client_at(0), b"hello")
    assert [(kind, direction) for kind, _, direction, *_ in delivered] == [(DATA, True), (DATA, True), (END, True)]
    assert delivered[-1][5] == 10


def test_fin_in_order_ends_the_direction_at_once():
    _, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"hello")
    ended = conversation.from_client(conversation.client_at(5), flags=TCP_ACK | TCP_FIN)
    assert [(event[0], event[5]) for event in ended] == [(END, 5)]


def test_bare_fin_overtaking_the_last_data_ends_the_direction_after_it():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"hello")
    assert conversation.from_client(conversation.client_at(10), flags=TCP_ACK | TCP_FIN) == []
    delivered = conversation.from_client(conversation.client_at(5), b"world")
    assert kinds(delivered) == [DATA, END]
    closing = conversation.from_server(conversation.server_at(0), flags=TCP_ACK | TCP_FIN,
                                       ack=conversation.client_at(11))
    assert kinds(closing) == [END, CLOSED] and len(reassembler) == 0


def test_both_fins_close_the_connection_and_forget_it():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"GET / HTTP/1.1\r\n\r\n")
    conversation.from_server(conversation.server_at(0), b"HTTP/1.1 204 No Content\r\n\r\n",
                             ack=conversation.client_at(18))
    conversation.from_client(conversation.client_at(18), flags=TCP_ACK | TCP_FIN, ack=conversation.server_at(27))
    closing = conversation.from_server(conversation.server_at(27), flags=TCP_ACK | TCP_FIN,
                                       ack=conversation.client_at(19))
    assert kinds(closing) == [END, CLOSED]
    assert len(reassembler) == 0
    # the last ACK of the teardown does not bring the connection back
    assert conversation.from_client(conversation.client_at(19), flags=TCP_ACK, ack=conversation.server_at(28)) == []
    assert len(reassembler) == 0 and reassembler.counters.connections == 1


def test_fin_after_a_hole_ends_once_the_peer_acknowledges_it():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"0123456789")
    conversation.from_client(conversation.client_at(20), b"KLMNOPQRST", flags=TCP_ACK | TCP_FIN)  # 10..19 lost
    acknowledged = conversation.from_server(conversation.server_at(0), flags=TCP_ACK, ack=conversation.client_at(31))
    assert kinds(acknowledged) == [GAP, DATA, END]
    closing = conversation.from_server(conversation.server_at(0), flags=TCP_ACK | TCP_FIN,
                                       ack=conversation.client_at(31))
    assert CLOSED in kinds(closing)
    assert len(reassembler) == 0


def test_rst_closes_the_connection_after_delivering_what_was_held():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"abc")
    conversation.from_client(conversation.client_at(6), b"ghi")  # 3..5 never captured
    reset = conversation.from_server(conversation.server_at(0), flags=TCP_RST, ack=0)
    # the reset ends both streams, the server's (which reset it) first, then the connection closes
    assert [(kind, to_server) for kind, _, to_server, *_ in reset] == [
        (GAP, True), (DATA, True), (END, False), (END, True), (CLOSED, True)]
    assert [payload for kind, _, _, _, payload, *_ in reset[:2]] == [3, b"ghi"]
    assert len(reassembler) == 0


def test_a_new_syn_on_a_reused_four_tuple_starts_a_new_connection():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"GET /old HTTP/1.1\r\n\r\n")
    old = conversation.events[-1][1]
    reused = Conversation(reassembler, client_isn=900_000, server_isn=700_000)
    restarted = reused.handshake(time=1.0)
    assert kinds(restarted)[0] == CLOSED and restarted[0][1] is old
    delivered = reused.from_client(reused.client_at(0), b"GET /new HTTP/1.1\r\n\r\n", time=1.0)
    assert stream(delivered) == [(DATA, b"GET /new HTTP/1.1\r\n\r\n", 0)]
    assert delivered[0][1] is not old
    assert reassembler.counters.connections == 2 and len(reassembler) == 1


def test_a_retransmitted_syn_is_not_a_new_connection():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"abc")
    assert conversation.from_client(CLIENT_ISN, flags=TCP_SYN, ack=0) == []
    assert conversation.from_server(SERVER_ISN, flags=TCP_SYN | TCP_ACK, ack=conversation.client_at(0)) == []
    conversation.from_client(conversation.client_at(3), b"def")
    assert received(conversation.events) == b"abcdef"
    assert reassembler.counters.connections == 1


def test_a_new_syn_after_a_clean_close_starts_over():
    reassembler, conversation = new()
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), flags=TCP_ACK | TCP_FIN)
    conversation.from_server(conversation.server_at(0), flags=TCP_ACK | TCP_FIN, ack=conversation.client_at(1))
    again = Conversation(reassembler, client_isn=CLIENT_ISN + 100_000)
    again.handshake()
    assert stream(again.from_client(again.client_at(0), b"x")) == [(DATA, b"x", 0)]
    assert reassembler.counters.connections == 2


def test_max_connections_evicts_the_least_recently_seen():
    reassembler = TcpReassembler({SERVER_PORT}, ReassemblyLimits(max_connections=2))
    first, second, third = (Conversation(reassembler, client_port=port) for port in (40001, 40002, 40003))
    first.handshake(time=1.0)
    second.handshake(time=2.0)
    first.from_client(first.client_at(0), b"still here", time=3.0)
    opened = third.handshake(time=4.0)
    closed = [event[1] for event in opened if event[0] == CLOSED]
    assert [connection.client_port for connection in closed] == [40002]
    assert reassembler.counters.evicted_connections == 1
    assert len(reassembler) == 2
    more = first.from_client(first.client_at(10), b"!", time=5.0)
    assert stream(more) == [(DATA, b"!", 10)]
    assert reassembler.counters.connections == 3


def test_idle_connections_expire_and_are_counted():
    reassembler = TcpReassembler({SERVER_PORT}, ReassemblyLimits(idle_timeout=10.0))
    quiet, busy = Conversation(reassembler, client_port=40001), Conversation(reassembler, client_port=40002)
    quiet.handshake(time=0.0)
    busy.handshake(time=0.0)
    busy.from_client(busy.client_at(0), b"x", time=8.0)
    assert reassembler.expire(9.0) == []
    expired = reassembler.expire(11.0)
    assert [(event[0], event[1].client_port) for event in expired] == [(CLOSED, 40001)]
    assert reassembler.counters.expired_connections == 1
    assert len(reassembler) == 1


def test_expiry_delivers_held_bytes_with_their_holes_before_closing():
    reassembler = TcpReassembler({SERVER_PORT}, ReassemblyLimits(idle_timeout=10.0))
    conversation = Conversation(reassembler)
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"abc")
    conversation.from_client(conversation.client_at(5), b"fg")
    expired = reassembler.expire(100.0)
    assert stream(expired) == [(GAP, 2, 3), (DATA, b"fg", 5)]
    assert kinds(expired)[-1] == CLOSED


def test_too_many_held_back_bytes_force_a_gap_instead_of_growing():
    limit = 100
    reassembler = TcpReassembler({SERVER_PORT}, ReassemblyLimits(max_pending_bytes_per_stream=limit))
    conversation = Conversation(reassembler)
    conversation.handshake()
    conversation.from_client(conversation.client_at(0), b"0" * 10)
    connection = conversation.events[-1][1]
    for offset in range(20, 20 + 200, 40):  # byte 10..19 lost; 200 bytes arrive behind the hole
        conversation.from_client(conversation.client_at(offset), bytes([65 + offset // 40]) * 40)
        assert connection.to_server.pending_bytes <= limit
    assert reassembler.counters.pending_overflows >= 1
    assert stream(conversation.events)[1] == (GAP, 10, 10)
    assert received(conversation.events) == b"0" * 10 + b"".join(bytes([65 + o // 40]) * 40 for o in range(20, 220, 40))


HELD_SEGMENTS = 50_000  # quadratic draining would take minutes here: a regression shows as a very slow test


def test_a_request_whose_first_byte_comes_last_after_many_held_segments():
    """A hostile client can send every byte but the first; the held bytes are delivered in order once it comes."""
    reassembler, conversation = new()
    conversation.handshake()
    content = bytes(range(256)) * (HELD_SEGMENTS // 256 + 1)
    offsets = list(range(1, HELD_SEGMENTS))
    random.Random(7).shuffle(offsets)
    for offset in offsets:
        conversation.from_client(conversation.client_at(offset), content[offset : offset + 1])
    assert stream(conversation.events) == []
    conversation.from_client(conversation.client_at(0), content[:1])
    delivered = stream(conversation.events)
    assert [position for _, _, position in delivered] == list(range(HELD_SEGMENTS))
    assert received(conversation.events) == content[:HELD_SEGMENTS]
    assert reassembler.counters.gaps == reassembler.counters.duplicate_segments == 0


def test_many_held_segments_with_holes_become_gaps_in_order_when_acknowledged():
    reassembler, conversation = new()
    conversation.handshake()
    for offset in range(2 * HELD_SEGMENTS - 1, 0, -2):  # odd bytes only, last first: every even byte is lost
        conversation.from_client(conversation.client_at(offset), b"x")
    conversation.from_server(conversation.server_at(0), flags=TCP_ACK, ack=conversation.client_at(2 * HELD_SEGMENTS))
    delivered = stream(conversation.events)
    assert delivered == [event for offset in range(0, 2 * HELD_SEGMENTS, 2)
                         for event in ((GAP, 1, offset), (DATA, b"x", offset + 1))]
    assert reassembler.counters.gaps == HELD_SEGMENTS


@pytest.mark.parametrize("flags", [TCP_ACK, TCP_ACK | TCP_FIN, TCP_RST, TCP_ACK | TCP_RST])
def test_a_bare_control_segment_of_an_unknown_connection_creates_nothing(flags):
    reassembler, conversation = new()
    assert conversation.from_client(123_456, flags=flags, ack=654_321) == []
    assert conversation.from_server(654_321, flags=flags, ack=123_456) == []
    assert len(reassembler) == 0 and reassembler.counters.connections == 0


def test_segments_of_other_ports_are_counted_and_ignored():
    reassembler = TcpReassembler({SERVER_PORT})
    assert reassembler.feed(0.0, (CLIENT, 40000, SERVER, 9999, 1, 1, TCP_ACK | PSH, b"GET / HTTP/1.1\r\n\r\n")) == []
    assert reassembler.counters.other_ports == 1 and len(reassembler) == 0


def test_close_all_closes_every_connection_at_capture_end():
    reassembler = TcpReassembler({SERVER_PORT})
    for port in (40001, 40002, 40003):
        Conversation(reassembler, client_port=port).handshake()
    closed = reassembler.close_all(5.0)
    assert sorted(event[1].client_port for event in closed if event[0] == CLOSED) == [40001, 40002, 40003]
    assert len(reassembler) == 0
