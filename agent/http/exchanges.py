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
from agent.http.parser import TUNNEL, MessageParser, ParserCounters
from agent.tcp.reassembly import CLOSED, DATA, END, GAP, Connection, StreamEvent

# Requests one connection may have waiting for an answer. Beyond it, the answers are clearly not being
# captured (a one-sided capture): holding more would only grow memory.
MAX_PENDING = 1024


class Exchange:
    __slots__ = ("connection", "request", "response", "response_size", "status", "response_end", "request_done",
                 "response_done", "emitted")

    def __init__(self, connection: Connection, request: Message | None) -> None:
        self.connection = connection
        self.request = request          # None: a request whose head was lost; its response is discarded
        self.response: Message | None = None  # the final response, once its head is known
        self.response_size = 0          # every byte sent for this request, interim 1xx responses included
        self.status = 0                 # the final status; 0 while none was seen
        self.response_end = 0.0
        self.request_done = request is None
        self.response_done = False
        self.emitted = False            # handed on already (response timeout); a late answer is dropped


@dataclass
class ExchangeCounters:
    requests: int = 0
    lost_exchanges: int = 0          # request or response head lost to a gap or unparseable
    unmatched_responses: int = 0     # responses to requests the capture never showed
    unanswered: int = 0              # handed on with status 0
    late_responses: int = 0          # arrived after the request was handed on unanswered
    unpaired_overflows: int = 0      # a connection's queue hit MAX_PENDING: its waiting requests handed on


class HttpConnection:
    def __init__(self, connection: Connection, parser_counters: ParserCounters, counters: ExchangeCounters,
                 max_head_bytes: int, out: list[Exchange]) -> None:
        self.connection = connection
        self.counters = counters
        self.out = out                           # where finished exchanges go; the stage drains it
        self.pending: deque[Exchange] = deque()
        self.answering: Exchange | None = None   # the exchange the response being parsed belongs to
        synced = connection.saw_syn
        self.requests = MessageParser(True, synced, parser_counters, self._request_head, self._request_complete,
                                      self._request_lost, max_head_bytes)
        self.responses = MessageParser(False, synced, parser_counters, self._response_head,
                                       self._response_complete, self._response_lost, max_head_bytes,
                                       self._method_answered)

    def close(self, time: float) -> None:
        """The connection is over: whatever is still waiting is handed on with what is known of it."""
        self.requests.end(time)
        self.responses.end(time)
        while self.pending:
            exchange = self.pending.popleft()
            if exchange.request is not None and not exchange.emitted:
                self._emit(exchange)

    def expire(self, cutoff: float) -> None:
        """Hand on, unanswered, complete requests still waiting for a response since before `cutoff`."""
        for exchange in self.pending:
            request = exchange.request
            if (request is not None and exchange.request_done and not exchange.response_done
                    and not exchange.emitted and request.end_time < cutoff and exchange is not self.answering):
                self._emit(exchange)

    def _method_answered(self) -> str:
        exchange = self._next_unanswered()
        return exchange.request.method if exchange is not None and exchange.request is not None else "GET"

    def _next_unanswered(self) -> Exchange | None:
        for exchange in self.pending:
            if not exchange.response_done:
                return exchange
        return None

    def _request_head(self, message: Message) -> None:
        self.counters.requests += 1
        self._enqueue(Exchange(self.connection, message))

    def _request_complete(self, message: Message) -> None:
        for exchange in reversed(self.pending):
            if exchange.request is message:
                exchange.request_done = True
                self._flush()
                return

    def _request_lost(self) -> None:
        """Keep the lost request's place in the queue, so its response pairs with it and is discarded."""
        self.counters.lost_exchanges += 1
        self._enqueue(Exchange(self.connection, None))

    def _enqueue(self, exchange: Exchange) -> None:
        if len(self.pending) >= MAX_PENDING:
            self._stop_pairing()
        self.pending.append(exchange)

    def _stop_pairing(self) -> None:
        """So many requests wait that their answers are not being captured: hand each on, unanswered unless
        its answer began, and let the responses pick up again at the next status line."""
        self.counters.unpaired_overflows += 1
        for exchange in self.pending:
            if exchange.request is not None and not exchange.emitted:
                self._emit(exchange)
        self.pending.clear()
        self.answering = None
        self.responses.resync()

    def _response_head(self, message: Message) -> None:
        exchange = self._next_unanswered()
        request = exchange.request if exchange is not None else None
        if request is not None and 0 <= message.peer_acked < request.head_end:
            exchange = None  # the server began this answer before it had that request: not its answer
        self.answering = exchange
        if exchange is not None and not exchange.emitted and (message.status >= 200 or message.status == 101):
            exchange.status, exchange.response = message.status, message  # known even if the body is cut short

    def _response_complete(self, message: Message) -> None:
        exchange, self.answering = self.answering, None
        final = message.status >= 200 or message.status == 101
        if exchange is None:
            self.counters.unmatched_responses += final
            return
        if not final:
            exchange.response_size += message.size if not exchange.emitted else 0
            self.answering = exchange  # an interim response: the final one follows
            return
        exchange.response_done = True
        if exchange.emitted:  # handed on unanswered already: it stays as it was billed
            self.counters.late_responses += 1
        else:
            exchange.response_size += message.size
            exchange.status, exchange.response_end = message.status, message.end_time
        request = exchange.request
        if message.status == 101 or (request is not None and request.method == "CONNECT" and message.status < 300):
            self.requests.state = TUNNEL  # bill the upgrade, ignore the tunnel
        self._flush()

    def _response_lost(self) -> None:
        """A response head we could not read: that exchange is lost, the ones after it are not."""
        exchange = self._next_unanswered()
        self.answering = None
        if exchange is not None:
            self.counters.lost_exchanges += exchange.request is not None and not exchange.emitted
            exchange.response_done, exchange.request, exchange.request_done = True, None, True
            self._flush()

    def _flush(self) -> None:
        pending = self.pending
        while pending and pending[0].response_done and pending[0].request_done:
            exchange = pending.popleft()
            if exchange.request is not None and not exchange.emitted:
                self._emit(exchange)

    def _emit(self, exchange: Exchange) -> None:
        exchange.emitted = True
        if exchange.status == 0:
            self.counters.unanswered += 1
        self.out.append(exchange)


class HttpExchanges:
    """Stream events in, completed exchanges out, for every connection the reassembler reports."""

    def __init__(self, response_timeout: float = 60.0, max_head_bytes: int = 65536) -> None:
        self.response_timeout = response_timeout
        self.max_head_bytes = max_head_bytes
        self.parser_counters = ParserCounters()
        self.counters = ExchangeCounters()
        self._connections: dict[Connection, HttpConnection] = {}
        self._finished: list[Exchange] = []

    def feed(self, events: list[StreamEvent]) -> None:
        connections = self._connections
        for kind, connection, to_server, time, payload, position, peer_acked in events:
            http = connections.get(connection)
            if http is None:
                if kind == CLOSED:
                    continue
                http = connections[connection] = HttpConnection(
                    connection, self.parser_counters, self.counters, self.max_head_bytes, self._finished
                )
            if kind == DATA:
                parser = http.requests if to_server else http.responses
                parser.feed(payload, time, position, peer_acked)  # type: ignore[arg-type]
            elif kind == GAP:
                (http.requests if to_server else http.responses).gap(payload, time)  # type: ignore[arg-type]
            elif kind == END:
                (http.requests if to_server else http.responses).end(time)
            else:
                http.close(time)
                del connections[connection]

    def expire(self, now: float) -> None:
        cutoff = now - self.response_timeout
        for http in self._connections.values():
            if http.pending:
                http.expire(cutoff)

    def take(self) -> list[Exchange]:
        """The exchanges finished since the last call, in the order they finished. Every connection keeps
        appending to the one list, so it is emptied in place."""
        finished = self._finished[:]
        self._finished.clear()
        return finished
