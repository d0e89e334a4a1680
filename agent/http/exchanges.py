"""Pairs requests with responses, in order, per connection: the HTTP stage of the pipeline.

HTTP/1.x answers requests in the order they were sent, pipelined or not, so each connection keeps a
queue. A response is matched to the oldest unanswered request, but only if the server had received that
request when it began answering (its ACK says so); otherwise the response belongs to a request we never
saw (a capture that began mid-connection) and is set aside.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from agent.http.message import Message
from agent.http.parser import HEAD_PARSED, MESSAGE_COMPLETE, TUNNEL, MessageParser, ParserCounters
from agent.tcp.reassembly import CLOSED, DATA, END, GAP, Connection, StreamEvent


@dataclass(slots=True, eq=False)
class Exchange:
    connection: Connection
    request: Message | None          # None: a request whose head was lost; its response is discarded
    response_size: int = 0           # every byte sent for this request, interim 1xx responses included
    status: int = 0                  # the final status; 0 while none was seen
    response_end: float = 0.0
    request_done: bool = False
    response_done: bool = False
    emitted: bool = False            # already handed on (after a response timeout); a late answer is dropped


@dataclass
class ExchangeCounters:
    requests: int = 0
    lost_exchanges: int = 0          # request or response head lost to a gap or unparseable
    unmatched_responses: int = 0     # responses to requests the capture never showed
    unanswered: int = 0              # handed on with status 0
    late_responses: int = 0          # arrived after the request was handed on unanswered


class HttpConnection:
    def __init__(self, connection: Connection, parser_counters: ParserCounters, counters: ExchangeCounters,
                 max_head_bytes: int) -> None:
        self.connection = connection
        self.counters = counters
        self.pending: deque[Exchange] = deque()
        self.answering: Exchange | None = None  # the exchange the response being parsed belongs to
        self.unmatched = False                   # the response being parsed belongs to no known request
        synced = connection.saw_syn
        self.requests = MessageParser(True, synced, parser_counters, max_head_bytes)
        self.responses = MessageParser(False, synced, parser_counters, max_head_bytes, self._method_answered)

    def data(self, to_server: bool, payload: bytes, time: float, position: int, peer_acked: int,
             out: list[Exchange]) -> None:
        parser = self.requests if to_server else self.responses
        self._handle(to_server, parser.feed(payload, time, position, peer_acked), out)

    def gap(self, to_server: bool, size: int, time: float, out: list[Exchange]) -> None:
        parser = self.requests if to_server else self.responses
        self._handle(to_server, parser.gap(size, time), out)

    def end(self, to_server: bool, time: float, out: list[Exchange]) -> None:
        parser = self.requests if to_server else self.responses
        self._handle(to_server, parser.end(time), out)

    def close(self, time: float, out: list[Exchange]) -> None:
        """The connection is over: whatever is still waiting is handed on with what is known of it."""
        self.end(True, time, out)
        self.end(False, time, out)
        while self.pending:
            exchange = self.pending.popleft()
            if exchange.request is not None and not exchange.emitted:
                self._emit(exchange, out)

    def expire(self, cutoff: float, out: list[Exchange]) -> None:
        """Hand on, unanswered, complete requests still waiting for a response since before `cutoff`."""
        for exchange in self.pending:
            request = exchange.request
            if (request is not None and exchange.request_done and not exchange.response_done
                    and not exchange.emitted and request.end_time < cutoff and exchange is not self.answering):
                self._emit(exchange, out)

    def _method_answered(self) -> str:
        exchange = self._next_unanswered()
        return exchange.request.method if exchange is not None and exchange.request is not None else "GET"

    def _next_unanswered(self) -> Exchange | None:
        for exchange in self.pending:
            if not exchange.response_done:
                return exchange
        return None

    def _handle(self, to_server: bool, events: list, out: list[Exchange]) -> None:
        for kind, message in events:
            if to_server:
                self._on_request(kind, message, out)
            else:
                self._on_response(kind, message, out)

    def _on_request(self, kind: int, message: Message | None, out: list[Exchange]) -> None:
        if kind == HEAD_PARSED:
            self.counters.requests += 1
            self.pending.append(Exchange(self.connection, message))
        elif kind == MESSAGE_COMPLETE:
            for exchange in reversed(self.pending):
                if exchange.request is message:
                    exchange.request_done = True
                    self._flush(out)
                    break
        else:  # a request we could not read: keep its place in the queue so its response pairs with it
            self.counters.lost_exchanges += 1
            self.pending.append(Exchange(self.connection, None, request_done=True))

    def _on_response(self, kind: int, message: Message | None, out: list[Exchange]) -> None:
        if kind == HEAD_PARSED:
            assert message is not None
            exchange = self._next_unanswered()
            request = exchange.request if exchange is not None else None
            self.unmatched = exchange is None or (
                request is not None and 0 <= message.peer_acked < request.head_end
            )
            self.answering = None if self.unmatched else exchange
            if self.answering is not None and (message.status >= 200 or message.status == 101):
                self.answering.status = message.status  # known even if the body is cut short
        elif kind == MESSAGE_COMPLETE:
            assert message is not None
            exchange, self.answering = self.answering, None
            if self.unmatched or exchange is None:
                self.counters.unmatched_responses += message.status >= 200 or message.status == 101
                return
            exchange.response_size += message.size
            if message.status >= 200 or message.status == 101:
                exchange.status, exchange.response_done, exchange.response_end = message.status, True, message.end_time
                if message.status == 101 or (
                    exchange.request is not None and exchange.request.method == "CONNECT" and message.status < 300
                ):
                    self.requests.state = TUNNEL  # bill the upgrade, ignore the tunnel
                if exchange.emitted:
                    self.counters.late_responses += 1
                self._flush(out)
            else:
                self.answering = exchange  # an interim response: the final one follows
        else:  # a response head we could not read: that exchange is lost, the next ones are not
            exchange = self._next_unanswered()
            self.answering = None
            if exchange is not None:
                self.counters.lost_exchanges += exchange.request is not None and not exchange.emitted
                exchange.response_done, exchange.request = True, None
                self._flush(out)

    def _flush(self, out: list[Exchange]) -> None:
        pending = self.pending
        while pending and pending[0].response_done and (pending[0].request_done or pending[0].request is None):
            exchange = pending.popleft()
            if exchange.request is not None and not exchange.emitted:
                self._emit(exchange, out)

    def _emit(self, exchange: Exchange, out: list[Exchange]) -> None:
        exchange.emitted = True
        if exchange.status == 0:
            self.counters.unanswered += 1
        out.append(exchange)


class HttpExchanges:
    """Stream events in, completed exchanges out, for every connection the reassembler reports."""

    def __init__(self, response_timeout: float = 60.0, max_head_bytes: int = 65536) -> None:
        self.response_timeout = response_timeout
        self.max_head_bytes = max_head_bytes
        self.parser_counters = ParserCounters()
        self.counters = ExchangeCounters()
        self._connections: dict[Connection, HttpConnection] = {}

    def feed(self, event: StreamEvent, out: list[Exchange]) -> None:
        kind, connection, to_server, time, payload, position, peer_acked = event
        http = self._connections.get(connection)
        if http is None:
            if kind == CLOSED:
                return
            http = self._connections[connection] = HttpConnection(
                connection, self.parser_counters, self.counters, self.max_head_bytes
            )
        if kind == DATA:
            http.data(to_server, payload, time, position, peer_acked, out)  # type: ignore[arg-type]
        elif kind == GAP:
            http.gap(to_server, payload, time, out)  # type: ignore[arg-type]
        elif kind == END:
            http.end(to_server, time, out)
        else:
            http.close(time, out)
            del self._connections[connection]

    def expire(self, now: float, out: list[Exchange]) -> None:
        cutoff = now - self.response_timeout
        for http in self._connections.values():
            if http.pending:
                http.expire(cutoff, out)
