"""The HTTP stage on its own: the message parser fed one direction's bytes, and the exchange pairing fed
the stream events of a real TCP reassembler, with sizes and statuses checked against the bytes sent.

Both run in the core. Its reassembler's events carry the connection's id where the Python stage put its
`Connection`; `Connection._feed` below puts a `ConnectionInfo`-like view there again (ids made unique
across reassemblers, since several tests share one `HttpExchanges` between two of them)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from agent import _core
from agent._core import CLOSED, DATA, END, GAP, MAX_PENDING, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, HttpExchanges, Message
from agent._core import MessageParser, ParserCounters

CONNECTION_IDS = itertools.count(1)

PSH = 0x08


class Recorder:
    """The parser's three callbacks, recording what they were told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Message | None]] = []

    def head(self, message: Message) -> None:
        self.calls.append(("head", message))

    def complete(self, message: Message) -> None:
        self.calls.append(("complete", message))

    def lost(self) -> None:
        self.calls.append(("lost", None))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def completed(self) -> list[Message]:
        return [message for name, message in self.calls if name == "complete"]


class Direction:
    """A parser for one direction plus the stream position, so tests feed pieces as segments would arrive."""

    def __init__(self, is_request: bool = True, synced: bool = True, methods: tuple[str, ...] = (), **options) -> None:
        """`methods`: the requests the responses answer, in order (GET once they run out)."""
        self.record = Recorder()
        self.counters = ParserCounters()
        answered = iter(methods)
        self.parser = MessageParser(is_request, synced, self.counters, self.record.head, self.record.complete,
                                    self.record.lost, method_of_response=lambda: next(answered, "GET"), **options)
        self.position = 0

    def feed(self, data: bytes, piece: int | None = None, time: float = 0.0) -> None:
        piece = piece or len(data) or 1
        for start in range(0, len(data), piece):
            chunk = data[start:start + piece]
            self.parser.feed(chunk, time, self.position)
            self.position += len(chunk)

    def gap(self, size: int, time: float = 0.0) -> None:
        self.parser.gap(size, time)
        self.position += size


def request(method: str = "GET", target: str = "/orders", body: bytes = b"", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: api.example.com", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def response(status: int = 200, body: bytes = b"ok", headers: tuple[str, ...] = (), length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} Reason", "Server: test", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value;other\r\nhello\r\n"
           b"A ; spaced-ext\r\n0123456789\r\n"
           b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")


# ---------------------------------------------------------------- the message parser, one direction


def test_content_length_body_is_counted_and_ends_the_message():
    wire = request("POST", "/orders", body=b'{"item": 1}')
    direction = Direction()
    direction.feed(wire + request("GET", "/next"))
    assert direction.record.names() == ["head", "complete", "head", "complete"]
    first, second = direction.record.completed()
    assert (first.method, first.target, first.version) == ("POST", "/orders", "1.1")
    assert first.size == len(wire) and first.head_end == len(wire) - 11
    assert first.header("content-length") == "11" and first.header("HOST") == "api.example.com"
    assert (second.target, second.position) == ("/next", len(wire))


@pytest.mark.parametrize("piece", [1, 2, 7, None])
def test_chunked_body_with_extensions_and_trailers_in_any_pieces(piece):
    following = response(404, b"nope")
    direction = Direction(is_request=False)
    direction.feed(CHUNKED + following, piece=piece)
    assert direction.record.names() == ["head", "complete", "head", "complete"]
    chunked, after = direction.record.completed()
    assert chunked.size == len(CHUNKED) and chunked.status == 200
    assert after.size == len(following) and after.status == 404 and after.position == len(CHUNKED)
    assert direction.counters.parse_errors == 0


def test_chunked_request_body_fed_one_byte_at_a_time():
    wire = (b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n0\r\nTrailer-Field: x\r\n\r\n")
    direction = Direction()
    direction.feed(wire, piece=1)
    assert [message.size for message in direction.record.completed()] == [len(wire)]


def test_head_split_across_many_segments():
    wire = request("GET", "/split?page=2", headers=("User-Agent: curl/8.5.0", "apikey: k1"))
    direction = Direction()
    direction.feed(wire, piece=3)
    assert direction.record.names() == ["head", "complete"]
    message = direction.record.completed()[0]
    assert message.target == "/split?page=2" and message.size == len(wire)
    assert message.header("user-agent") == "curl/8.5.0" and message.header("apikey") == "k1"


def test_head_end_split_between_cr_and_lf():
    direction = Direction()
    direction.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r")
    direction.feed(b"\nGET /b HTTP/1.1\r\n\r\n")
    assert [message.target for message in direction.record.completed()] == ["/", "/b"]
    assert direction.record.completed()[1].position == 27


def test_lf_only_line_endings():
    wire = b"POST /lf HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc"
    direction = Direction()
    direction.feed(wire + b"GET /next HTTP/1.1\n\n")
    first, second = direction.record.completed()
    assert (first.target, first.size, first.header("host")) == ("/lf", len(wire), "a")
    assert second.target == "/next"


def test_interim_responses_then_final():
    continue_ = b"HTTP/1.1 100 Continue\r\n\r\n"
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    final = response(201, b"created")
    direction = Direction(is_request=False)
    direction.feed(continue_ + early_hints + final)
    assert [(name, message.status) for name, message in direction.record.calls] == [
        ("head", 100), ("complete", 100), ("head", 103), ("complete", 103), ("head", 201), ("complete", 201)]
    assert [message.size for message in direction.record.completed()] == [len(continue_), len(early_hints), len(final)]


@pytest.mark.parametrize("status, method", [(200, "HEAD"), (204, "GET"), (304, "GET")])
def test_responses_without_a_body_despite_content_length(status, method):
    head_only = f"HTTP/1.1 {status} X\r\nContent-Length: 1000\r\n\r\n".encode()
    following = response(200, b"next")
    direction = Direction(is_request=False, methods=(method, "GET"))
    direction.feed(head_only + following)
    assert [(message.status, message.size) for message in direction.record.completed()] == [
        (status, len(head_only)), (200, len(following))]


def test_close_delimited_response_ends_at_end_of_stream():
    wire = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 5000
    direction = Direction(is_request=False)
    direction.feed(wire, piece=1460)
    assert direction.record.names() == ["head"]
    direction.parser.end(1.0)
    assert direction.record.names() == ["head", "complete"]
    message = direction.record.completed()[0]
    assert message.size == len(wire) and message.end_time == 1.0


def test_content_length_body_cut_short_by_end_of_stream_ends_with_the_bytes_sent():
    direction = Direction(is_request=False)
    direction.feed(response(200, b"x" * 100)[:-40])
    direction.parser.end(2.0)
    [message] = direction.record.completed()
    assert (message.status, message.size, message.end_time) == (200, len(response(200, b"x" * 100)) - 40, 2.0)


def test_tunnel_after_101_is_ignored():
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    direction = Direction(is_request=False)
    direction.feed(upgrade)
    direction.feed(b"\x81\x05hello" + response(200, b"inside the tunnel"))
    direction.gap(100)
    direction.feed(response(500))
    direction.parser.end(1.0)
    assert [(name, message.status) for name, message in direction.record.calls] == [("head", 101), ("complete", 101)]
    assert direction.counters.parse_errors == direction.counters.lost_heads == 0


@pytest.mark.parametrize("gap_size", [1, 50, 59])
def test_gap_inside_a_body_of_known_length_is_skipped(gap_size):
    body = bytes(range(100))
    wire = request("POST", "/upload", body=body)
    head_length = len(wire) - len(body)
    direction = Direction()
    direction.feed(wire[:head_length + 40])
    direction.gap(gap_size)
    direction.feed(wire[head_length + 40 + gap_size:] + request("GET", "/after"))
    uploaded, after = direction.record.completed()
    assert uploaded.size == len(wire)
    assert after.target == "/after" and after.position == len(wire)
    assert direction.record.names().count("lost") == 0


def test_gap_ending_exactly_at_the_end_of_a_body_completes_it():
    wire = request("POST", "/upload", body=b"z" * 100)
    direction = Direction()
    direction.feed(wire[:-30])
    direction.gap(30)
    direction.feed(request("GET", "/after"))
    assert [(m.target, m.size) for m in direction.record.completed()] == [
        ("/upload", len(wire)), ("/after", len(request("GET", "/after")))]


def test_gap_covering_exactly_the_rest_of_a_chunk_completes_the_message():
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    direction = Direction()
    direction.feed(head + b"5\r\n")
    direction.gap(5)  # "hello", to the chunk's last byte
    direction.feed(b"\r\n0\r\n\r\n")
    assert direction.record.names() == ["head", "complete"]
    assert direction.record.completed()[0].size == len(head) + len(b"5\r\nhello\r\n0\r\n\r\n")
    assert direction.counters.parse_errors == 0


@pytest.mark.parametrize("stray", [b"\r\n", b"\n"])
def test_gap_swallowing_a_body_end_and_a_stray_line_end_loses_no_message(stray):
    """Clients may send a CRLF after a body (nginx skips it): lost with the body's end, it is no request."""
    wire = request("POST", "/upload", body=b"{}")
    direction = Direction()
    direction.feed(wire[:-1])
    direction.gap(1 + len(stray))
    direction.feed(request("GET", "/after"))
    assert direction.record.names() == ["head", "complete", "head", "complete"]
    assert [(m.target, m.size) for m in direction.record.completed()] == [
        ("/upload", len(wire)), ("/after", len(request("GET", "/after")))]
    assert direction.counters.lost_heads == 0


def test_gap_in_a_head_loses_that_message_and_resyncs_at_the_next_request_line():
    lost = request("GET", "/lost", headers=("X-Long: " + "v" * 100,))
    direction = Direction()
    direction.feed(lost[:20])
    direction.gap(40)
    direction.feed(lost[60:])  # the rest of the damaged head
    direction.feed(request("GET", "/found"))
    assert direction.record.names() == ["lost", "head", "complete"]
    found = direction.record.completed()[0]
    assert found.target == "/found" and found.position == len(lost)
    assert direction.counters.lost_heads == 1


def test_mid_stream_start_inside_a_request_waits_for_the_server_then_resyncs_at_a_request_line():
    """A request stream joined inside a body: what it holds is not searched for requests (it may hold request
    lines) until the server has spoken; then the next request line that begins a segment is the next request."""
    tail_of_a_body = b'"items": [1, 2, 3]}\r\n' * 5
    in_the_body = tail_of_a_body + request("GET", "/in-the-body")
    direction = Direction(synced=False)
    direction.feed(in_the_body)
    assert direction.record.names() == []
    direction.parser.peer_spoke()
    direction.feed(tail_of_a_body)
    direction.feed(request("POST", "/next", body=b"{}"))
    assert direction.record.names() == ["head", "complete"]
    message = direction.record.completed()[0]
    assert (message.target, message.position, message.size) == ("/next", len(in_the_body) + len(tail_of_a_body),
                                                                 len(request("POST", "/next", body=b"{}")))
    assert direction.counters.resync_skipped_bytes == len(in_the_body) + len(tail_of_a_body)


def test_mid_stream_start_resyncs_at_a_request_line_inside_a_segment_and_across_segments():
    junk = b"...end of a previous body\r\n"
    wire = request("GET", "/inside")
    direction = Direction(synced=False)
    direction.parser.peer_spoke()  # the server answered the request the stream was joined inside
    direction.feed(junk + wire[:9])   # the start line is split after "GET /insi"
    direction.feed(wire[9:])
    assert direction.record.names() == ["head", "complete"]
    message = direction.record.completed()[0]
    assert (message.target, message.position, message.size) == ("/inside", len(junk), len(wire))


def test_mid_stream_start_resyncs_at_a_status_line():
    direction = Direction(is_request=False, synced=False)
    direction.feed(b"ing the body of an earlier response")
    direction.feed(response(200, b"fine"))
    assert [(m.status, m.size) for m in direction.record.completed()] == [(200, len(response(200, b"fine")))]


def test_oversized_head_is_counted_lost_and_not_buffered():
    limit = 1024
    direction = Direction(max_head_bytes=limit)
    direction.feed(b"GET /huge HTTP/1.1\r\nHost: a\r\n")
    for _ in range(200):  # 100 KB of headers that never end
        direction.feed(b"X-Pad: " + b"p" * 500 + b"\r\n")
        assert len(direction.parser.buffer) <= limit + 512
    assert direction.counters.oversized_heads == 1
    assert direction.record.names() == ["lost"]
    direction.feed(b"\r\n")
    direction.feed(request("GET", "/small"))
    assert [message.target for message in direction.record.completed()] == ["/small"]


@pytest.mark.parametrize("head_size, piece", [
    (3000, 100), (3000, 1460),
    (3000, None),  # one segment
    (1900, 1000),  # the end of the head arrives in the segment that crosses the limit
])
def test_a_head_over_the_limit_is_lost_however_it_is_segmented(head_size, piece):
    padding = "p" * (head_size - len(request("GET", "/big", headers=("X-Pad: ",))))
    wire = request("GET", "/big", headers=("X-Pad: " + padding,))
    assert len(wire) == head_size
    direction = Direction(max_head_bytes=1024)
    direction.feed(wire, piece=piece)
    assert direction.record.names() == ["lost"]
    assert direction.counters.oversized_heads == 1


def test_header_line_without_colon_is_ignored_as_nginx_ignores_it():
    direction = Direction()
    direction.feed(b"GET /served HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n")
    direction.feed(request("GET", "/good"))
    assert direction.record.names() == ["head", "complete", "head", "complete"]
    assert direction.counters.parse_errors == 0


def test_header_line_without_colon_but_with_a_space_loses_the_request():
    direction = Direction()
    direction.feed(b"GET /bad HTTP/1.1\r\nHost: a\r\nNo Colon Here\r\n\r\n")
    direction.feed(request("GET", "/good"))
    assert direction.record.names() == ["lost", "head", "complete"]
    assert direction.counters.parse_errors == 1


def test_obsolete_line_folding_loses_the_request():
    direction = Direction()
    direction.feed(b"GET /folded HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n")
    assert direction.record.names() == ["lost"]


@pytest.mark.parametrize("framing", [
    "Content-Length: abc", "Content-Length: -1", "Content-Length: 5\r\nContent-Length: 6", "Content-Length: 1 2",
    "Transfer-Encoding: gzip"])
def test_invalid_framing_on_a_request_loses_it(framing):
    direction = Direction()
    direction.feed(f"POST /x HTTP/1.1\r\nHost: a\r\n{framing}\r\n\r\n".encode())
    direction.feed(request("GET", "/good"))
    assert direction.record.names() == ["lost", "head", "complete"]
    assert direction.record.completed()[0].target == "/good"


def test_end_of_stream_inside_a_head_reports_it_lost():
    direction = Direction()
    direction.feed(b"GET /cut HTTP/1.1\r\nHost: a\r\n")
    direction.parser.end(1.0)
    assert direction.record.names() == ["lost"]
    assert direction.counters.lost_heads == 1


# ---------------------------------------------------------------- exchanges, fed by a real reassembler


class Connection:
    """Both sides of one connection on port 8000, as segments through a real reassembler into HttpExchanges."""

    CLIENT, SERVER = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])

    def __init__(self, http: HttpExchanges | None = None, handshake: bool = True, client_port: int = 40000) -> None:
        self.tcp = _core.TcpReassembler([8000])
        self.connections: dict[int, SimpleNamespace] = {}
        self.http = http or HttpExchanges()
        self.client_port = client_port
        self.client_next, self.server_next = 1001, 5001
        self.client_received = self.server_next  # what the client has acknowledged so far
        if handshake:
            self._feed(0.0, True, 1000, 0, TCP_SYN, b"")
            self._feed(0.0, False, 5000, 1001, TCP_SYN | TCP_ACK, b"")
            self._feed(0.0, True, 1001, 5001, TCP_ACK, b"")

    def _feed(self, time: float, from_client: bool, seq: int, ack: int, flags: int, payload: bytes) -> None:
        if from_client:
            segment = (self.CLIENT, self.client_port, self.SERVER, 8000, seq, ack, flags, payload)
        else:
            segment = (self.SERVER, 8000, self.CLIENT, self.client_port, seq, ack, flags, payload)
        self._deliver(self.tcp.feed(time, segment))

    def _deliver(self, events: list) -> None:
        for connection_id, client, client_port, server, server_port, saw_syn, base_seq, *_ in self.tcp.connections():
            if connection_id not in self.connections:
                self.connections[connection_id] = SimpleNamespace(
                    id=next(CONNECTION_IDS), client=client, client_port=client_port, server=server,
                    server_port=server_port)
            self.connections[connection_id].saw_syn, self.connections[connection_id].to_server_base_seq = (
                saw_syn, base_seq)
        self.http.feed([(kind, self.connections[connection_id], *rest) for kind, connection_id, *rest in events])

    def client(self, data: bytes, time: float = 0.0, lost: bool = False, flags: int = TCP_ACK | PSH) -> None:
        """The client sends `data`; `lost`: it was sent but the capture missed it."""
        if not lost:
            self._feed(time, True, self.client_next, self.server_next, flags, data)
        self.client_next += len(data)

    def server(self, data: bytes, time: float = 0.0, ack: int | None = None, flags: int = TCP_ACK | PSH) -> None:
        """The server sends `data`, acknowledging everything the client sent unless told otherwise."""
        self._feed(time, False, self.server_next, self.client_next if ack is None else ack, flags, data)
        self.server_next += len(data)

    def end_of_capture(self, time: float) -> None:
        """The capture ends: every connection still open is closed."""
        self._deliver(self.tcp.close_all(time))

    def done(self) -> list:
        return self.http.take()


def test_a_request_and_its_response_become_one_exchange():
    wire_request, wire_response = request("GET", "/orders?page=2"), response(200, b"[1,2]")
    connection = Connection()
    connection.client(wire_request, time=1.0)
    connection.server(wire_response, time=1.25)
    [exchange] = connection.done()
    assert exchange.request.target == "/orders?page=2" and exchange.request.size == len(wire_request)
    assert (exchange.status, exchange.response_size, exchange.response_end) == (200, len(wire_response), 1.25)
    assert exchange.request.start_time == 1.0
    assert connection.http.counters.requests == 1


def test_pipelined_requests_are_answered_in_order():
    requests = [request("GET", f"/item/{n}") for n in range(3)]
    responses = [response(200, b"a"), response(404, b"missing"), response(201, b"made it")]
    connection = Connection()
    connection.client(b"".join(requests), time=1.0)
    connection.server(b"".join(responses)[:50], time=2.0)
    connection.server(b"".join(responses)[50:], time=2.0)
    exchanges = connection.done()
    assert [(e.request.target, e.status, e.response_size) for e in exchanges] == [
        (f"/item/{n}", [200, 404, 201][n], len(responses[n])) for n in range(3)]


def test_response_size_includes_interim_responses():
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    interim, final = b"HTTP/1.1 100 Continue\r\n\r\n", response(201, b"created")
    connection = Connection()
    connection.client(head)
    connection.server(interim)
    connection.client(b"data")
    connection.server(final)
    [exchange] = connection.done()
    assert exchange.status == 201
    assert exchange.response_size == len(interim) + len(final)
    assert exchange.request.size == len(head) + 4


def test_head_request_answer_has_no_body_and_the_next_exchange_is_intact():
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    connection = Connection()
    connection.client(request("HEAD", "/big") + request("GET", "/small"))
    connection.server(head_answer + response(200, b"tiny"))
    exchanges = connection.done()
    assert [(e.request.method, e.status, e.response_size) for e in exchanges] == [
        ("HEAD", 200, len(head_answer)), ("GET", 200, len(response(200, b"tiny")))]


def test_close_delimited_response_is_emitted_when_the_server_closes():
    wire = b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 3000
    connection = Connection()
    connection.client(request("GET", "/stream"))
    connection.server(wire[:1500])
    connection.server(wire[1500:])
    assert connection.done() == []
    connection.server(b"", flags=TCP_ACK | TCP_FIN)
    [exchange] = connection.done()
    assert exchange.response_size == len(wire) and exchange.status == 200


def test_upgrade_is_billed_once_and_the_tunnel_ignored():
    connection = Connection()
    connection.client(request("GET", "/ws", headers=("Upgrade: websocket", "Connection: Upgrade")))
    connection.server(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    connection.client(b"\x81\x85" + request("GET", "/inside"))
    connection.server(response(200, b"inside too"))
    connection.client(b"", flags=TCP_ACK | TCP_FIN)
    connection.server(b"", flags=TCP_ACK | TCP_FIN)
    exchanges = connection.done()
    assert [(e.request.target, e.status) for e in exchanges] == [("/ws", 101)]
    assert connection.http.counters.requests == 1


def test_lost_body_bytes_leave_the_exchange_complete_with_the_size_sent():
    body = b"b" * 3000
    wire = request("POST", "/upload", body=body)
    connection = Connection()
    connection.client(wire[:1000])
    connection.client(wire[1000:2000], lost=True)
    connection.client(wire[2000:])
    connection.server(response(201, b"stored"))
    [exchange] = connection.done()
    assert exchange.request.size == len(wire)
    assert exchange.status == 201
    assert connection.tcp.counters["gaps"] == 1


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_lost_body_end_with_a_stray_crlf_does_not_shift_the_pairing(pipelined):
    connection = Connection()
    upload = request("POST", "/upload", body=b"{}")
    connection.client(upload[:-2])
    connection.client(upload[-2:] + b"\r\n", lost=True)  # the server's ACK shows it was sent
    connection.server(response(201, b"stored"))
    answers = [(request("GET", "/a"), response(200, b"a")), (request("GET", "/b"), response(401, b"no key")),
               (request("GET", "/c"), response(200, b"c"))]
    if pipelined:
        connection.client(b"".join(wire for wire, _ in answers))
        connection.server(b"".join(answer for _, answer in answers))
    else:
        for wire, answer in answers:
            connection.client(wire)
            connection.server(answer)
    assert [(e.request.target, e.status) for e in connection.done()] == [
        ("/upload", 201), ("/a", 200), ("/b", 401), ("/c", 200)]
    assert connection.http.counters.lost_exchanges == 0


def test_lost_request_head_loses_only_that_exchange():
    first, second = request("GET", "/first"), request("GET", "/second")
    connection = Connection()
    connection.client(first, lost=True)
    connection.client(second)
    connection.server(response(200, b"for the first"))
    connection.server(response(404, b"for the second"))
    exchanges = connection.done()
    assert [(e.request.target, e.status, e.response_size) for e in exchanges] == [
        ("/second", 404, len(response(404, b"for the second")))]
    assert connection.http.counters.lost_exchanges == 1


def test_capture_starting_mid_connection_resyncs_at_the_next_request():
    connection = Connection(handshake=False)
    connection.client(b'rest of an upload body"}')
    connection.server(b"nd of an earlier response body")
    connection.client(request("GET", "/after-restart"))
    connection.server(response(200, b"ok"))
    exchanges = connection.done()
    assert [(e.request.target, e.status) for e in exchanges] == [("/after-restart", 200)]


def test_response_sent_before_the_server_had_the_request_is_not_paired():
    connection = Connection()
    before_request = connection.client_next
    connection.client(request("GET", "/mine"))
    # an answer whose ACK shows the server had not yet received /mine: it answers something else
    connection.server(response(200, b"not yours"), ack=before_request)
    assert connection.done() == []
    connection.server(response(202, b"yours"))
    [exchange] = connection.done()
    assert (exchange.request.target, exchange.status) == ("/mine", 202)
    assert exchange.response_size == len(response(202, b"yours"))
    assert connection.http.counters.unmatched_responses == 1


def test_response_timeout_emits_status_zero_and_a_late_answer_is_not_emitted_again():
    http = HttpExchanges(response_timeout=60.0)
    connection = Connection(http)
    connection.client(request("GET", "/slow"), time=10.0)
    http.expire(69.0)
    assert connection.done() == []
    http.expire(71.0)
    [exchange] = connection.done()
    assert (exchange.request.target, exchange.status) == ("/slow", 0)
    assert http.counters.unanswered == 1
    connection.server(response(200, b"finally"), time=80.0)
    connection.client(request("GET", "/next"), time=81.0)
    connection.server(response(200, b"quick"), time=81.5)
    assert [(e.request.target, e.status) for e in connection.done()] == [("/next", 200)]
    assert http.counters.late_responses == 1


def test_exchanges_of_interleaved_connections_stay_apart():
    http = HttpExchanges()
    one, two = Connection(http, client_port=40001), Connection(http, client_port=40002)
    one.client(request("GET", "/one"))
    two.client(request("GET", "/two"))
    two.server(response(404, b""))
    one.server(response(200, b"1"))
    finished = http.take()
    assert [(e.request.target, e.status, e.connection.client_port) for e in finished] == [
        ("/two", 404, 40002), ("/one", 200, 40001)]


def test_a_late_response_does_not_alter_the_exchange_already_handed_on():
    http = HttpExchanges(response_timeout=60.0)
    connection = Connection(http)
    connection.client(request("GET", "/slow"), time=10.0)
    http.expire(71.0)
    [exchange] = connection.done()
    connection.server(response(200, b"finally"), time=80.0)
    assert (exchange.status, exchange.response_size) == (0, 0)


# ---------------------------------------------------------------- exchanges, fed stream events by hand


def hand_made_connection(saw_syn: bool = True) -> SimpleNamespace:
    return SimpleNamespace(id=next(CONNECTION_IDS), client=bytes([10, 0, 0, 1]), client_port=40000,
                           server=bytes([10, 0, 0, 2]), server_port=8000, saw_syn=saw_syn, to_server_base_seq=1001)


def test_stream_events_by_hand_gap_in_a_request_head_and_a_close():
    """(kind, connection, to_server, time, payload, position, peer_acked) tuples, as the reassembler makes them."""
    connection = hand_made_connection()
    lost, kept = request("GET", "/lost"), request("GET", "/kept")
    first_answer, second_answer = response(500, b"for the lost one"), b"HTTP/1.1 200 OK\r\n\r\nclose-delimited"
    requested = len(lost) + len(kept)
    http = HttpExchanges()
    http.feed([
        (DATA, connection, True, 1.0, lost[:10], 0, 0),
        (GAP, connection, True, 1.0, len(lost) - 10, 10, -1),
        (DATA, connection, True, 1.0, kept, len(lost), 0),
        (DATA, connection, False, 2.0, first_answer, 0, requested),
        (DATA, connection, False, 2.0, second_answer, len(first_answer), requested),
        (END, connection, False, 3.0, 0, len(first_answer) + len(second_answer), -1),
        (CLOSED, connection, True, 3.0, 0, 0, -1),
    ])
    exchanges = http.take()
    assert [(e.request.target, e.status, e.response_size) for e in exchanges] == [("/kept", 200, len(second_answer))]
    assert http.counters.lost_exchanges == 1 and http.parser_counters.lost_heads == 1


def test_requests_still_unanswered_when_the_connection_closes_are_emitted_with_status_zero():
    connection = hand_made_connection()
    wire = request("GET", "/a") + request("GET", "/b")
    http = HttpExchanges()
    http.feed([(DATA, connection, True, 1.0, wire, 0, 0),
               (DATA, connection, False, 1.5, response(200, b"a"), 0, len(wire))])
    assert [e.request.target for e in http.take()] == ["/a"]
    http.feed([(CLOSED, connection, True, 9.0, 0, 0, -1)])
    assert [(e.request.target, e.status) for e in http.take()] == [("/b", 0)]
    assert http.counters.unanswered == 1


def test_requests_never_answered_keep_the_queue_bounded_and_are_each_emitted_once():
    """A capture holding only the client's side of a keep-alive connection: nothing will ever pair."""
    http = HttpExchanges(response_timeout=60.0)
    connection = Connection(http)
    emitted, longest_queue = [], 0
    for number in range(20_000):
        time = number * 0.01
        connection.client(request("GET", f"/n/{number}"), time=time)
        [(_, waiting)] = http.waiting()
        if number % 100 == 0:
            http.expire(time)
            emitted += connection.done()
        longest_queue = max(longest_queue, waiting)
    connection.client(b"", time=300.0, flags=TCP_ACK | TCP_FIN)
    connection.end_of_capture(300.0)  # the server's side, its FIN included, never shows
    emitted += connection.done()
    assert longest_queue <= MAX_PENDING
    assert sorted(e.request.target for e in emitted) == sorted(f"/n/{number}" for number in range(20_000))
    assert {e.status for e in emitted} == {0} and http.counters.unanswered == 20_000
    assert http.counters.unpaired_overflows >= 1


def test_a_request_its_client_gave_up_on_is_logged_as_nginx_logs_it_499():
    """The client closes (or resets) before any response and the server then closes too: nginx's 499."""
    for closing in (TCP_ACK | TCP_FIN, TCP_RST):
        connection = Connection()
        connection.client(request("GET", "/slow"), time=1.0)
        connection.client(b"", time=6.0, flags=closing)
        if closing != TCP_RST:
            connection.server(b"", time=6.001, flags=TCP_ACK | TCP_FIN)
        [exchange] = connection.done()
        assert (exchange.status, exchange.response_size) == (499, 0)
        assert (connection.http.counters.client_closed, connection.http.counters.unanswered) == (1, 0)


def test_a_request_whose_client_left_before_all_of_its_body_is_logged_as_nginx_logs_it_400():
    """nginx logs a body cut short by the client's close as 400 ("client prematurely closed connection"),
    not 499, which is for a whole request given up on."""
    connection = Connection()
    head = b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n"
    connection.client(head + b"x" * 400, time=1.0)
    connection.client(b"", time=2.0, flags=TCP_ACK | TCP_FIN)
    connection.server(b"", time=2.001, flags=TCP_ACK | TCP_FIN)
    [exchange] = connection.done()
    assert (exchange.status, exchange.response_size) == (400, 0)
    assert (connection.http.counters.client_closed, connection.http.counters.unanswered) == (1, 0)


def test_a_server_that_closes_first_leaves_the_request_unanswered():
    connection = Connection()
    connection.client(request("GET", "/dropped"), time=1.0)
    connection.server(b"", time=2.0, flags=TCP_ACK | TCP_FIN)
    connection.client(b"", time=2.001, flags=TCP_ACK | TCP_FIN)
    [exchange] = connection.done()
    assert exchange.status == 0 and connection.http.counters.unanswered == 1
