"""Incremental HTTP/1.x message framing for one direction of a connection.

Fed bytes (and gaps) in stream order, it reports where each message's head ends and where the
message ends, counting body bytes without keeping them. After a gap it cannot bridge, or a message it
cannot frame, it resynchronises at the next start line instead of giving up on the connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.http.message import Message

# parser states
HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, UNTIL_CLOSE, TUNNEL, RESYNC = range(9)

HEAD_END = re.compile(rb"\r?\n\r?\n")
# Lenient on purpose: a server that answers a request line with a sloppy version still served a request.
REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) +(\S*)(?: +HTTP/([0-9.]*))? *\r?\n")
STATUS_LINE = re.compile(rb"HTTP/\d\.\d +(\d{3})(?:[ \t][^\n]*)?\r?\n")
FRAMING_HEADERS = re.compile(rb"\n(content-length|transfer-encoding)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
# Where to pick a stream up again: a start line at a segment boundary, else at the start of a line.
REQUEST_START = re.compile(rb"^[A-Z][A-Za-z_-]{0,19} \S+ HTTP/1\.[019]\r?$", re.MULTILINE)
RESPONSE_START = re.compile(rb"^HTTP/1\.[019] \d{3}", re.MULTILINE)
REQUEST_START_HERE = re.compile(rb"[A-Z][A-Za-z_-]{0,19} \S+ HTTP/1\.[019]\r?\n")
RESPONSE_START_HERE = re.compile(rb"HTTP/1\.[019] \d{3}")
# A request whose head nginx rejects with 400 before Kong runs (so Kong's plugin never bills it): a header
# line whose name holds a space or a control character (`apikey : k`, obsolete line folding, `Bad Name`),
# or whose name is empty. A line of name characters alone, without a colon, nginx ignores (the request is
# served), and so does this. The possessive name keeps it as fast as a plain scan on a well-formed head.
BAD_HEADER_LINE = re.compile(
    rb"\n(?:[^:\x00-\x20\x7f]++(?!\r?\n)[\x00-\x20\x7f]|[\x00-\x09\x0b\x0c\x0e-\x20\x7f:]|\r(?!\n))")
HEX_DIGITS = b"0123456789abcdefABCDEF"
MAX_LINE = 4096
RESYNC_KEEP = 256  # bytes kept while searching, so a start line split across segments is still found


OnMessage = Callable[[Message], None]


@dataclass
class ParserCounters:
    parse_errors: int = 0
    lost_heads: int = 0
    resync_skipped_bytes: int = 0
    oversized_heads: int = 0


class MessageParser:
    """One direction, reporting to three callbacks: `on_head` (the head is known, a body may follow),
    `on_complete` (the message's last byte was seen) and `on_lost` (a message began, but its head was lost
    to a gap or could not be parsed). `method_of_response` tells a response parser what the request was
    (the answer to HEAD has no body)."""

    def __init__(
        self,
        is_request: bool,
        synced: bool,
        counters: ParserCounters,
        on_head: OnMessage,
        on_complete: OnMessage,
        on_lost: Callable[[], None],
        max_head_bytes: int = 65536,
        method_of_response: Callable[[], str] | None = None,
    ) -> None:
        self.is_request = is_request
        self.state = HEAD if synced else RESYNC
        self.counters = counters
        self.on_head, self.on_complete, self.on_lost = on_head, on_complete, on_lost
        self.max_head_bytes = max_head_bytes
        self.method_of_response = method_of_response or (lambda: "GET")
        self.buffer = b""          # partial head, partial chunk line, or resync window
        self.message: Message | None = None
        self.remaining = 0

    def feed(self, data: bytes, time: float, position: int, peer_acked: int = -1) -> None:
        offset, end = 0, len(data)
        while offset < end:
            state = self.state
            if state == HEAD:
                offset = self._head(data, offset, time, position, peer_acked)
            elif state == BODY or state == CHUNK_DATA:
                take = min(self.remaining, end - offset)
                self.message.size += take  # type: ignore[union-attr]
                self.remaining -= take
                offset += take
                if self.remaining == 0:
                    if state == BODY:
                        self._complete(time)
                    else:
                        self.state = CHUNK_END
            elif state == UNTIL_CLOSE:
                self.message.size += end - offset  # type: ignore[union-attr]
                offset = end
            elif state == TUNNEL:
                offset = end
            elif state == RESYNC:
                offset = self._resync(data, offset, time, position, peer_acked)
            else:
                offset = self._chunk_line(data, offset, time)

    def gap(self, size: int, time: float) -> None:
        """`size` bytes of this stream were not captured."""
        state, message = self.state, self.message
        if state == TUNNEL:
            return
        if message is not None and state != HEAD:
            if state == UNTIL_CLOSE:
                message.size += size
                return
            if (state == BODY or state == CHUNK_DATA) and self.remaining >= size:
                message.size += size  # still inside the body: the gap is only skipped
                self.remaining -= size
                if self.remaining == 0:  # it ends exactly where the body or the chunk's data does
                    if state == BODY:
                        self._complete(time)
                    else:
                        self.state = CHUNK_END
                return
            if state == BODY:  # the body ends inside the gap; what follows it is (part of) a lost message head
                message.size += self.remaining
                size -= self.remaining
                self._complete(time)
                if size <= 2:  # no head is that short: a stray CRLF after the body, which nginx skips
                    self.state = RESYNC
                    return
                state = HEAD
            else:  # a chunked body whose end is now unknown: it ends where the next message starts
                message.size += size
        if state == HEAD:  # the gap swallowed (the start of) a message head
            self.counters.lost_heads += 1
            self.message = None
            self.on_lost()
        self.state, self.buffer = RESYNC, b""

    def end(self, time: float) -> None:
        """The direction is over (FIN, RST, expiry): a close-delimited body ends here, anything else is cut short."""
        if self.state == HEAD:
            if self.buffer.strip():  # a head cut short, or bytes that never were one
                starts_well = (REQUEST_START_HERE if self.is_request else RESPONSE_START_HERE).match(self.buffer)
                if starts_well:
                    self.counters.lost_heads += 1
                else:
                    self.counters.parse_errors += 1
                self.on_lost()
        elif self.message is not None and self.state != TUNNEL:
            self._complete(time)
        self.message, self.state, self.buffer = None, TUNNEL, b""

    def resync(self) -> None:
        """Drop the message in progress and pick the stream up again at the next start line."""
        if self.state != TUNNEL:
            self.message, self.buffer, self.state = None, b"", RESYNC

    def _head(self, data: bytes, offset: int, time: float, position: int, peer_acked: int) -> int:
        if self.buffer:
            return self._continue_head(data, offset, time)
        if data[offset] in b"\r\n":  # blank lines between messages are allowed
            while offset < len(data) and data[offset] in b"\r\n":
                offset += 1
            if offset == len(data):
                return offset
        self.message = Message(time, position + offset, peer_acked)
        # The head ends at its first blank line. The usual one is CRLF, and the first "\n\r\n" finds it
        # whatever the line before it ended with; only an earlier bare "\n\n" needs the full search.
        blank_line = data.find(b"\n\r\n", offset)
        if blank_line < 0 or data.find(b"\n\n", offset, blank_line + 1) >= 0:
            found = HEAD_END.search(data, offset)
            head_end = found.end() if found is not None else -1
        else:
            head_end = blank_line + 3
        if head_end >= 0:
            if head_end - offset > self.max_head_bytes:
                self._lose_oversized_head()
            else:
                self._parse_head(data[offset:head_end], time)
            return head_end
        self.buffer = data[offset:]
        self._check_head_size()
        return len(data)

    def _continue_head(self, data: bytes, offset: int, time: float) -> int:
        """The head began in an earlier segment: look for its end across the boundary."""
        searched_from = max(0, len(self.buffer) - 3)
        buffered = len(self.buffer)
        self.buffer += data[offset:]
        found = HEAD_END.search(self.buffer, searched_from)
        if found is None:
            self._check_head_size()
            return len(data)
        head = self.buffer[: found.end()]
        self.buffer = b""
        if len(head) > self.max_head_bytes:
            self._lose_oversized_head()
        else:
            self._parse_head(head, time)
        return offset + found.end() - buffered

    def _check_head_size(self) -> None:
        if len(self.buffer) > self.max_head_bytes:
            self._lose_oversized_head()

    def _lose_oversized_head(self) -> None:
        """A head over the limit is lost however it was segmented: memory stays bounded, and it is counted."""
        self.counters.oversized_heads += 1
        self._lose_message()

    def _parse_head(self, head: bytes, time: float) -> None:
        message = self.message
        assert message is not None
        message.head = head
        message.size = len(head)
        message.head_end = message.position + len(head)
        if self.is_request:
            parsed = REQUEST_LINE.match(head)
            if parsed is None:
                self._lose_message()
                return
            if BAD_HEADER_LINE.search(head, parsed.end() - 1):
                self._lose_message()
                return
            method, target, version = parsed.groups()
            message.method, message.target = method.decode("latin-1"), target.decode("latin-1")
            if version is None and target.startswith(b"HTTP/"):  # "OPTIONS HTTP/1.1": no target
                message.target, version = "", target[5:]
            message.version = version.decode("latin-1") if version is not None else ""
        else:
            parsed = STATUS_LINE.match(head)
            if parsed is None:
                self._lose_message()
                return
            message.status = int(parsed.group(1))
        framing = self._framing(message, head)
        if framing is None:  # framing we cannot trust
            if self.is_request:  # nginx answers 400 before Kong runs: nothing to bill
                self._lose_message()
                return
            self.counters.parse_errors += 1
            framing = UNTIL_CLOSE, 0  # a response then ends where the connection does
        self.on_head(message)
        state, self.remaining = framing
        if state == HEAD or state == TUNNEL:  # no body
            self._complete(time)
        self.state = state

    def _framing(self, message: Message, head: bytes) -> tuple[int, int] | None:
        """(state after the head, body length), or None when the head's framing headers are invalid."""
        if not self.is_request:
            status, method = message.status, self.method_of_response()
            if status == 101 or (method == "CONNECT" and 200 <= status < 300):
                return TUNNEL, 0
            if status < 200 or status == 204 or status == 304 or method == "HEAD":
                return HEAD, 0
        found = FRAMING_HEADERS.findall(head)
        if len(found) == 1 and len(found[0][0]) == 14:  # the usual head: one Content-Length, one value
            length = found[0][1].strip()
            if length.isdigit() and len(length) <= 18:
                return (BODY, int(length)) if int(length) else (HEAD, 0)
        if self.is_request:
            return self._request_framing(message, found)
        lengths: set[bytes] = set()
        transfer_encoding = None
        for name, value in found:
            if len(name) == 17:  # transfer-encoding
                transfer_encoding = value.strip().lower()
            else:
                lengths.update(part.strip() for part in value.split(b","))
        if transfer_encoding is not None:
            return (CHUNK_SIZE, 0) if transfer_encoding.rsplit(b",", 1)[-1].strip() == b"chunked" else None
        if not lengths:
            return UNTIL_CLOSE, 0
        length = lengths.pop()
        if lengths or not length.isdigit() or len(length) > 18:
            return None
        return (BODY, int(length)) if int(length) else (HEAD, 0)

    @staticmethod
    def _request_framing(message: Message, found: list[tuple[bytes, bytes]]) -> tuple[int, int] | None:
        """As strict as nginx, which answers 400 (501 for an unknown coding) before Kong runs: one framing
        header at most, a Content-Length of digits only, and `chunked` alone on HTTP/1.1 and later."""
        if not found:
            return HEAD, 0
        if len(found) > 1:  # a repeated header, or both framings
            return None
        name, value = found[0]
        if len(name) == 14:  # a Content-Length the usual path could not read
            return None
        major, _, minor = message.version.partition(".")
        if not (major.isdigit() and minor.isdigit() and (int(major), int(minor)) >= (1, 1)):
            return None
        return (CHUNK_SIZE, 0) if value.strip().lower() == b"chunked" else None

    def _chunk_line(self, data: bytes, offset: int, time: float) -> int:
        """CHUNK_SIZE, CHUNK_END (the CRLF after chunk data) and TRAILERS all read one line at a time."""
        message = self.message
        assert message is not None
        newline = data.find(b"\n", offset)
        if newline < 0:
            message.size += len(data) - offset
            self.buffer += data[offset:]
            if len(self.buffer) > MAX_LINE:
                self.counters.parse_errors += 1
                self.state, self.buffer = RESYNC, b""
            return len(data)
        message.size += newline + 1 - offset
        line = (self.buffer + data[offset:newline]).strip()
        self.buffer = b""
        state = self.state
        if state == CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()
            # hex digits only: int() would also take "0x10", "+5" and "1_0", which nginx refuses
            chunk_size = int(size_text, 16) if 0 < len(size_text) <= 16 and not size_text.strip(HEX_DIGITS) else -1
            if chunk_size < 0:
                self.counters.parse_errors += 1
                self.state = RESYNC
            elif chunk_size == 0:
                self.state = TRAILERS
            else:
                self.state, self.remaining = CHUNK_DATA, chunk_size
        elif state == CHUNK_END:
            if line:  # chunk data longer than announced: framing is lost
                self.counters.parse_errors += 1
                self.state = RESYNC
            else:
                self.state = CHUNK_SIZE
        elif not line:  # the blank line that ends the trailers
            self._complete(time)
        return newline + 1

    def _resync(self, data: bytes, offset: int, time: float, position: int, peer_acked: int) -> int:
        if (REQUEST_START_HERE if self.is_request else RESPONSE_START_HERE).match(data, offset):
            self._skip(len(self.buffer))  # messages usually begin where a segment does
            if self.message is not None:
                self._complete(time)
            self.buffer, self.state = b"", HEAD
            return self._head(data, offset, time, position, peer_acked)
        window = self.buffer + data[offset:]
        kept_before = len(self.buffer)
        found = (REQUEST_START if self.is_request else RESPONSE_START).search(window)
        if found is None:
            kept = window[-RESYNC_KEEP:]
            self._skip(len(window) - len(kept))
            self.buffer = kept
            return len(data)
        self._skip(found.start())
        if self.message is not None:  # a body cut by a gap ends where the next message starts
            self._complete(time)
        self.buffer, self.state = b"", HEAD
        start_in_data = found.start() - kept_before
        if start_in_data >= 0:
            return self._head(data, offset + start_in_data, time, position, peer_acked)
        # the start line began in the bytes kept from the previous segment
        self.message = Message(time, position + offset + start_in_data)
        self.buffer = window[found.start() : kept_before]
        return self._continue_head(data, offset, time)

    def _skip(self, count: int) -> None:
        if self.message is not None:
            self.message.size += count
        else:
            self.counters.resync_skipped_bytes += count

    def _lose_message(self) -> None:
        self.counters.parse_errors += 1
        self.message, self.buffer, self.state = None, b"", RESYNC
        self.on_lost()

    def _complete(self, time: float) -> None:
        message = self.message
        assert message is not None
        message.end_time = time
        self.message, self.state = None, HEAD
        self.on_complete(message)
