"""TCP reassembly into one ordered byte stream per direction, by sequence number.

Not by ACK number (grouping by ACK splits messages, the classic cause of lost requests). A hole in a
stream is declared a gap, and delivered as such, as soon as the peer acknowledges bytes beyond it: the
peer got them, so the capture lost them and waiting longer cannot help. Streams without a SYN (captures
that begin mid-connection) start at the first byte seen or at the sequence number the peer acknowledges.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from heapq import heappop, heappush

from agent.source.frames import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Segment

SEQ_MASK = 0xFFFFFFFF
HALF_SEQ_SPACE = 1 << 31

DATA = 0    # payload: bytes
GAP = 1     # payload: number of bytes lost
END = 2     # that direction sent FIN and everything before it was delivered
CLOSED = 3  # the connection is over (both FINs, RST, idle, evicted, capture end)


def seq_delta(seq: int, reference: int) -> int:
    """Signed distance from `reference` to `seq` in modulo-2^32 sequence space."""
    delta = (seq - reference) & SEQ_MASK
    return delta - (1 << 32) if delta >= HALF_SEQ_SPACE else delta


class HalfStream:
    """One direction of a connection: bytes delivered so far and out-of-order segments held back.

    `pending_positions` is a heap of `pending`'s keys: draining N held segments must not look for the
    lowest N times over (a hostile client holding back its first byte made that quadratic).
    """

    __slots__ = ("base_seq", "position", "pending", "pending_positions", "pending_bytes", "fin_position", "ended")

    def __init__(self) -> None:
        self.base_seq: int | None = None      # sequence number of stream position 0
        self.position = 0                      # bytes delivered (data or gap) so far
        self.pending: dict[int, bytes] = {}    # position -> out-of-order payload
        self.pending_positions: list[int] = []  # the same positions, as a heap
        self.pending_bytes = 0
        self.fin_position: int | None = None
        self.ended = False

    def start(self, seq: int) -> None:
        self.base_seq = seq
        self.position = 0

    def position_of(self, seq: int) -> int:
        assert self.base_seq is not None
        return self.position + seq_delta(seq, (self.base_seq + self.position) & SEQ_MASK)


@dataclass(slots=True, eq=False)
class Connection:
    """Compared by identity: the HTTP stage keys its per-connection state on it."""

    client: bytes
    client_port: int
    server: bytes
    server_port: int
    last_seen: float
    saw_syn: bool = False
    to_server: HalfStream = field(default_factory=HalfStream)
    to_client: HalfStream = field(default_factory=HalfStream)


# (kind, connection, to_server, timestamp, payload, position, peer_acked), a plain tuple for speed:
#   payload     DATA: the bytes; GAP: how many were lost; END/CLOSED: 0
#   position    stream position of the first byte (DATA/GAP)
#   peer_acked  DATA: position in the opposite stream this segment acknowledges, or -1
StreamEvent = tuple[int, "Connection", bool, float, "bytes | int", int, int]


@dataclass
class ReassemblyLimits:
    max_connections: int = 100_000
    max_pending_bytes_per_stream: int = 1 << 20
    idle_timeout: float = 300.0


@dataclass
class ReassemblyCounters:
    connections: int = 0
    other_ports: int = 0
    duplicate_segments: int = 0
    gaps: int = 0
    gap_bytes: int = 0
    pending_overflows: int = 0
    expired_connections: int = 0
    evicted_connections: int = 0


class TcpReassembler:
    def __init__(self, server_ports: set[int], limits: ReassemblyLimits | None = None) -> None:
        self.server_ports = server_ports
        self.limits = limits or ReassemblyLimits()
        self.counters = ReassemblyCounters()
        self._connections: OrderedDict[tuple, Connection] = OrderedDict()  # least recently seen first

    def __len__(self) -> int:
        return len(self._connections)

    def feed(self, timestamp: float, segment: Segment) -> list[StreamEvent]:
        src, sport, dst, dport, seq, ack, flags, payload = segment
        if dport in self.server_ports:
            key, to_server = (src, sport, dst, dport), True
        elif sport in self.server_ports:
            key, to_server = (dst, dport, src, sport), False
        else:
            self.counters.other_ports += 1
            return []
        connection = self._connections.get(key)
        if connection is not None and flags & 0x17 == TCP_ACK:  # no SYN, FIN or RST: maybe the fast path
            stream, peer = ((connection.to_server, connection.to_client) if to_server
                            else (connection.to_client, connection.to_server))
            if (not stream.pending and not peer.pending and stream.base_seq is not None and peer.base_seq is not None
                    and stream.fin_position is None):
                behind = (peer.base_seq + peer.position - ack) & SEQ_MASK  # how far the ACK trails the peer
                if behind < HALF_SEQ_SPACE and (seq - stream.base_seq - stream.position) & SEQ_MASK == 0:
                    # in order, nothing held back, nothing of the peer's unacknowledged: deliver it as it is
                    self._connections.move_to_end(key)
                    connection.last_seen = timestamp
                    if not payload:
                        return []
                    position = stream.position
                    stream.position = position + len(payload)
                    return [(DATA, connection, to_server, timestamp, payload, position, peer.position - behind)]
        events: list[StreamEvent] = []
        if connection is not None and flags & TCP_SYN and self._is_new_incarnation(connection, to_server, seq):
            self._close(connection, timestamp, events)
            connection = None
        if connection is None:
            if not payload and not flags & TCP_SYN:
                return events  # a bare ACK, FIN or RST of a connection we never saw: nothing to meter
            connection = self._open(key, timestamp, events)
        else:
            self._connections.move_to_end(key)
            connection.last_seen = timestamp
        stream, peer = ((connection.to_server, connection.to_client) if to_server
                        else (connection.to_client, connection.to_server))

        peer_acked = -1
        if flags & TCP_ACK:
            if peer.base_seq is None:
                peer.start(ack)  # the peer's next byte, learnt before we see the peer send anything
            peer_acked = peer.position_of(ack)
            if peer_acked > peer.position:
                self._advance(connection, not to_server, peer, peer_acked, timestamp, events)

        if flags & TCP_SYN:
            connection.saw_syn = True
            if stream.base_seq is None or stream.position == 0:
                stream.start((seq + 1) & SEQ_MASK)
            seq = (seq + 1) & SEQ_MASK  # data on a SYN (TCP Fast Open) starts after it
        elif stream.base_seq is None:
            stream.start(seq)

        if payload:
            self._receive(connection, to_server, stream, seq, payload, peer_acked, timestamp, events)
        if flags & TCP_FIN and stream.fin_position is None:
            stream.fin_position = stream.position_of(seq) + len(payload)
        if flags & TCP_RST:
            self._close(connection, timestamp, events)
        else:  # this segment's data, or its ACK of the peer's, may have completed either direction
            peer_ended = self._check_end(connection, not to_server, peer, timestamp, events)
            if self._check_end(connection, to_server, stream, timestamp, events) and peer_ended:
                self._close(connection, timestamp, events)
        return events

    def expire(self, now: float) -> list[StreamEvent]:
        """Close connections idle for longer than the limit (call it as capture time advances)."""
        events: list[StreamEvent] = []
        deadline = now - self.limits.idle_timeout
        while self._connections:
            connection = next(iter(self._connections.values()))
            if connection.last_seen >= deadline:
                break
            self.counters.expired_connections += 1
            self._close(connection, now, events)
        return events

    def close_all(self, now: float) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for connection in list(self._connections.values()):
            self._close(connection, now, events)
        return events

    def _open(self, key: tuple, timestamp: float, events: list[StreamEvent]) -> Connection:
        if len(self._connections) >= self.limits.max_connections:
            self.counters.evicted_connections += 1
            self._close(next(iter(self._connections.values())), timestamp, events)
        connection = Connection(key[0], key[1], key[2], key[3], timestamp)
        self._connections[key] = connection
        self.counters.connections += 1
        return connection

    @staticmethod
    def _is_new_incarnation(connection: Connection, to_server: bool, seq: int) -> bool:
        """A SYN on a known 4-tuple starts a new connection unless it is a retransmission of the first SYN."""
        stream = connection.to_server if to_server else connection.to_client
        if stream.base_seq is None:
            return False
        return not (connection.saw_syn and seq_delta(seq, stream.base_seq) == -1)

    def _receive(
        self,
        connection: Connection,
        to_server: bool,
        stream: HalfStream,
        seq: int,
        payload: bytes,
        peer_acked: int,
        timestamp: float,
        events: list[StreamEvent],
    ) -> None:
        position = stream.position_of(seq)
        if position > stream.position:
            held = stream.pending.get(position)
            if held is None:
                heappush(stream.pending_positions, position)
                stream.pending_bytes += len(payload)
            elif len(held) >= len(payload):
                self.counters.duplicate_segments += 1
                return
            else:
                stream.pending_bytes += len(payload) - len(held)
            stream.pending[position] = payload
            if stream.pending_bytes > self.limits.max_pending_bytes_per_stream:
                self.counters.pending_overflows += 1
                self._advance(connection, to_server, stream, stream.pending_positions[0], timestamp, events)
            return
        overlap = stream.position - position
        if overlap >= len(payload):
            self.counters.duplicate_segments += 1
            return
        if overlap:
            payload = payload[overlap:]
        events.append((DATA, connection, to_server, timestamp, payload, stream.position, peer_acked))
        stream.position += len(payload)
        if stream.pending:
            self._drain(connection, to_server, stream, timestamp, events)

    def _drain(
        self, connection: Connection, to_server: bool, stream: HalfStream, timestamp: float, events: list[StreamEvent]
    ) -> None:
        """Deliver held-back segments that have become contiguous."""
        pending, positions = stream.pending, stream.pending_positions
        while positions:
            position = positions[0]
            if position > stream.position:
                return
            heappop(positions)
            payload = pending.pop(position)
            stream.pending_bytes -= len(payload)
            overlap = stream.position - position
            if overlap < len(payload):
                events.append(
                    (DATA, connection, to_server, timestamp, payload[overlap:], stream.position, -1)
                )
                stream.position += len(payload) - overlap

    def _advance(
        self,
        connection: Connection,
        to_server: bool,
        stream: HalfStream,
        target: int,
        timestamp: float,
        events: list[StreamEvent],
    ) -> None:
        """Bring the stream up to `target`, delivering what is held and declaring the holes as gaps."""
        if stream.fin_position is not None:
            target = min(target, stream.fin_position)
        while stream.position < target:
            self._drain(connection, to_server, stream, timestamp, events)
            if stream.position >= target:
                break
            hole_end = min(stream.pending_positions[0], target) if stream.pending_positions else target
            lost = hole_end - stream.position
            self.counters.gaps += 1
            self.counters.gap_bytes += lost
            events.append((GAP, connection, to_server, timestamp, lost, stream.position, -1))
            stream.position = hole_end
        self._drain(connection, to_server, stream, timestamp, events)

    def _check_end(
        self, connection: Connection, to_server: bool, stream: HalfStream, timestamp: float, events: list[StreamEvent]
    ) -> bool:
        if not stream.ended and stream.fin_position is not None and stream.position >= stream.fin_position:
            stream.ended = True
            events.append((END, connection, to_server, timestamp, 0, stream.position, -1))
        return stream.ended

    def _close(self, connection: Connection, timestamp: float, events: list[StreamEvent]) -> None:
        """End a connection: what is still held back is delivered, with its holes as gaps."""
        for to_server, stream in ((True, connection.to_server), (False, connection.to_client)):
            if stream.pending:
                held_end = max(position + len(payload) for position, payload in stream.pending.items())
                self._advance(connection, to_server, stream, held_end, timestamp, events)
        events.append((CLOSED, connection, True, timestamp, 0, 0, -1))
        key = (connection.client, connection.client_port, connection.server, connection.server_port)
        self._connections.pop(key, None)
