"""Where a message's head and body end, and which requests never reach Kong: the gateway's nginx (1.22)
answers them 400 or 501 itself, so Kong's plugin never bills them and neither may we. Responses stay
lenient: the server sent them, so what it answered is billed."""

from __future__ import annotations

import pytest

from agent._core import Message, MessageParser, ParserCounters


class Parsed:
    """One direction's parser fed `wire` in pieces of `piece` bytes, with what its callbacks were told."""

    def __init__(self, wire: bytes, is_request: bool = True, piece: int | None = None) -> None:
        self.calls: list[str] = []
        self.completed: list[Message] = []
        self.counters = ParserCounters()
        parser = MessageParser(is_request, True, self.counters, lambda message: self.calls.append("head"),
                               self._complete, lambda: self.calls.append("lost"))
        piece = piece or len(wire)
        for start in range(0, len(wire), piece):
            parser.feed(wire[start:start + piece], 0.0, start)

    def _complete(self, message: Message) -> None:
        self.calls.append("complete")
        self.completed.append(message)


GOOD = b"GET /good HTTP/1.1\r\nHost: x\r\n\r\n"
GOOD_RESPONSE = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"


# ---------------------------------------------------------------- where a head ends


@pytest.mark.parametrize("piece", [None, 1, 3, 22, 26])
def test_a_bare_lf_header_line_before_a_crlf_blank_line_ends_the_head(piece):
    first = b"GET /a HTTP/1.1\r\nHost: x\n\r\n"
    second = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    parsed = Parsed(first + second, piece=piece)
    assert [(m.target, m.size, m.header("host")) for m in parsed.completed] == [
        ("/a", len(first), "x"), ("/b", len(second), "x")]
    assert parsed.counters.parse_errors == 0


def test_a_response_head_ending_in_lf_then_crlf_frames_its_body():
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok"
    parsed = Parsed(first + GOOD_RESPONSE, is_request=False)
    assert [(m.status, m.size) for m in parsed.completed] == [(200, len(first)), (404, len(GOOD_RESPONSE))]


# ---------------------------------------------------------------- requests nginx rejects before Kong runs


@pytest.mark.parametrize("headers", [
    b"Content-Length: 2\r\nContent-Length: 2",           # a duplicate, even with the same value
    b"Content-Length: 2, 2",
    b"Content-Length: +2",
    b"Content-Length: 2\r\nTransfer-Encoding: chunked",  # both framings
    b"Transfer-Encoding: chunked\r\nContent-Length: 2",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",                 # 501: any coding but chunked alone
    b"apikey : alice-key",                               # whitespace before the colon
    b"apikey\t: alice-key",
    b": no-name",
    b"X\x01Control: v",
    b"Bad Name: v",
    b"No Colon But Spaces",
    b"NoColon ",
])
def test_a_request_nginx_answers_400_or_501_is_lost_not_billed(headers):
    rejected = b"POST /x HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n\r\n"
    parsed = Parsed(rejected + GOOD)
    assert parsed.calls == ["lost", "head", "complete"]
    assert [m.target for m in parsed.completed] == ["/good"]
    assert parsed.counters.parse_errors == 1


def test_transfer_encoding_on_an_http_1_0_request_is_lost():
    parsed = Parsed(b"POST /x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n" + GOOD)
    assert parsed.calls == ["lost", "head", "complete"]


@pytest.mark.parametrize("headers, body", [
    (b"Transfer-Encoding:  CHUNKED  ", b"2\r\nab\r\n0\r\n\r\n"),
    (b"Content-Length:  2 ", b"ab"),
    (b"X@Odd: v\r\nX-\xc3\xa9: v", b""),                # nginx ignores such headers, it does not reject them
    (b"NoColonAtAll\r\nX_under: v", b""),                # ignored as well
    (b"X-Url: http://a:1/b\r\nX-Empty:", b""),
])
def test_requests_nginx_accepts_are_framed_and_kept(headers, body):
    accepted = b"POST /x HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n\r\n" + body
    parsed = Parsed(accepted + GOOD)
    assert [(m.target, m.size) for m in parsed.completed] == [("/x", len(accepted)), ("/good", len(GOOD))]
    assert parsed.counters.parse_errors == 0


@pytest.mark.parametrize("headers, body", [
    (b"Content-Length: 2\r\nContent-Length: 2", b"ok"),
    (b"Content-Length: 2, 2", b"ok"),
    (b"Content-Length: 9\r\nTransfer-Encoding: chunked", b"2\r\nok\r\n0\r\n\r\n"),
    (b"Transfer-Encoding: gzip, chunked", b"2\r\nok\r\n0\r\n\r\n"),
    (b"Server : lenient\r\nContent-Length: 0", b""),
])
def test_responses_stay_lenient(headers, body):
    answered = b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n\r\n" + body
    parsed = Parsed(answered + GOOD_RESPONSE, is_request=False)
    assert [(m.status, m.size) for m in parsed.completed] == [(200, len(answered)), (404, len(GOOD_RESPONSE))]
    assert parsed.counters.parse_errors == 0


# ---------------------------------------------------------------- chunk sizes


@pytest.mark.parametrize("size_line", [b"0x2", b"+2", b"0_2", b"-2", b"", b"2 2", b"12345678901234567"])
@pytest.mark.parametrize("is_request", [True, False])
def test_a_chunk_size_that_is_not_plain_hex_is_a_parse_error(size_line, is_request):
    start = b"POST /x HTTP/1.1\r\nHost: x\r\n" if is_request else b"HTTP/1.1 200 OK\r\n"
    chunked = start + b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nab\r\n0\r\n\r\n"
    following = GOOD if is_request else GOOD_RESPONSE
    parsed = Parsed(chunked + following, is_request=is_request)
    assert parsed.counters.parse_errors == 1
    assert parsed.completed[-1].size == len(following)  # the stream is picked up again at the next message


@pytest.mark.parametrize("size_line", [b"2", b"02", b"0000000000000002", b"2;ext=1", b"2 ;ext", b"2\t"])
def test_chunk_sizes_in_hex_with_extensions_are_read(size_line):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nab\r\n"
               b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n")
    parsed = Parsed(chunked + GOOD_RESPONSE, is_request=False)
    assert [m.size for m in parsed.completed] == [len(chunked), len(GOOD_RESPONSE)]
    assert parsed.counters.parse_errors == 0
