"""Incremental HTTP/1.x message framing for one direction of a connection.

Fed bytes (and gaps) in stream order, it reports where each message's head ends and where the message
ends, counting body bytes without keeping them. After a gap it cannot bridge, or a message it cannot
frame, it resynchronises at the next start line instead of giving up on the connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.http.message import Message

# parser states
HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, UNTIL_CLOSE, TUNNEL, RESYNC = range(9)

# what feed() reports, as (kind, message) pairs
HEAD_PARSED = 0       # the head is known; the body may follow
MESSAGE_COMPLETE = 1  # the last byte of the message has been seen
MESSAGE_LOST = 2      # a message began but its head was lost (gap) or unparseable: message is None

HEAD_END = re.compile(rb"\r?\n\r?\n")
REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) +(\S*) *HTTP/(\d\.\d) *")
STATUS_LINE = re.compile(r"HTTP/(\d\.\d) +(\d{3})(?:[ \t].*)?")
REQUEST_START = re.compile(rb"^[A-Z][A-Za-z_-]{0,19} \S+ HTTP/1\.[019]\r?$", re.MULTILINE)
RESPONSE_START = re.compile(rb"^HTTP/1\.[019] \d{3}", re.MULTILINE)
MAX_LINE = 4096
RESYNC_KEEP = 256  # bytes kept while searching, so a start line split across segments is still found

ParserEvents = list[tuple[int, Message | None]]


@dataclass
class ParserCounters:
    parse_errors: int = 0
    lost_heads: int = 0
    resync_skipped_bytes: int = 0
    oversized_heads: int = 0


class MessageParser:
    """One direction. `method_of_response` tells a response parser what the request was (HEAD has no body)."""

    def __init__(
        self,
        is_request: bool,
        synced: bool,
        counters: ParserCounters,
        max_head_bytes: int = 65536,
        method_of_response: Callable[[], str] | None = None,
    ) -> None:
        self.is_request = is_request
        self.state = HEAD if synced else RESYNC
        self.counters = counters
        self.max_head_bytes = max_head_bytes
        self.method_of_response = method_of_response or (lambda: "GET")
        self.buffer = b""          # partial head, partial chunk line, or resync window
        self.buffer_position = 0   # stream position of buffer[0] while resynchronising
        self.message: Message | None = None
        self.remaining = 0

    def feed(self, data: bytes, time: float, position: int, peer_acked: int = -1) -> ParserEvents:
        events: ParserEvents = []
        offset, end = 0, len(data)
        while offset < end:
            state = self.state
            if state == BODY or state == CHUNK_DATA:
                take = min(self.remaining, end - offset)
                self.message.size += take  # type: ignore[union-attr]
                self.remaining -= take
                offset += take
                if self.remaining == 0:
                    if state == BODY:
                        self._complete(time, events)
                    else:
                        self.state = CHUNK_END
            elif state == HEAD:
                offset = self._head(data, offset, time, position, peer_acked, events)
            elif state == UNTIL_CLOSE:
                self.message.size += end - offset  # type: ignore[union-attr]
                offset = end
            elif state == TUNNEL:
                offset = end
            elif state == RESYNC:
                offset = self._resync(data, offset, time, position, peer_acked, events)
            else:
                offset = self._chunk_line(data, offset, time, events)
        return events

    def gap(self, size: int, time: float) -> ParserEvents:
        """`size` bytes of this stream were not captured."""
        events: ParserEvents = []
        message, state = self.message, self.state
        if state == TUNNEL:
            return events
        if state in (BODY, CHUNK_DATA) and self.remaining > size:
            message.size += size  # type: ignore[union-attr]
            message.damaged = True  # type: ignore[union-attr]
            self.remaining -= size
            return events
        if state == BODY:
            message.size += self.remaining  # type: ignore[union-attr]
            message.damaged = True  # type: ignore[union-attr]
            size -= self.remaining
            self._complete(time, events)
            if size == 0:
                return events
            state = HEAD
        if state == HEAD or (state == RESYNC and message is None):
            if state == HEAD:
                self.counters.lost_heads += 1
                events.append((MESSAGE_LOST, None))
            self.message = None
        else:  # inside a body whose end is now unknown: it ends where the next message starts
            message.size += size  # type: ignore[union-attr]
            message.damaged = True  # type: ignore[union-attr]
        self.state, self.buffer = RESYNC, b""
        return events

    def end(self, time: float) -> ParserEvents:
        """The direction is over (FIN, RST, expiry): a close-delimited body ends here, anything else is cut short."""
        events: ParserEvents = []
        if self.message is not None and self.state != TUNNEL:
            if self.state != UNTIL_CLOSE:
                self.message.damaged = True
            self._complete(time, events)
        elif self.state == HEAD and self.buffer.strip():
            self.counters.lost_heads += 1
            events.append((MESSAGE_LOST, None))
        self.state, self.buffer = TUNNEL, b""
        return events

    def _head(
        self, data: bytes, offset: int, time: float, position: int, peer_acked: int, events: ParserEvents
    ) -> int:
        if self.buffer:
            return self._continue_head(data, offset, time, events)
        while offset < len(data) and data[offset] in b"\r\n":  # blank lines between messages are allowed
            offset += 1
        if offset == len(data):
            return offset
        self.message = Message(start_time=time, position=position + offset, peer_acked=peer_acked)
        found = HEAD_END.search(data, offset)
        if found is not None:
            self._parse_head(data[offset : found.end()], time, events)
            return found.end()
        self.buffer = data[offset:]
        self._check_head_size(events)
        return len(data)

    def _continue_head(self, data: bytes, offset: int, time: float, events: ParserEvents) -> int:
        """The head began in an earlier segment: look for its end across the boundary."""
        searched_from = max(0, len(self.buffer) - 3)
        buffered = len(self.buffer)
        self.buffer += data[offset:]
        found = HEAD_END.search(self.buffer, searched_from)
        if found is None:
            self._check_head_size(events)
            return len(data)
        head = self.buffer[: found.end()]
        self.buffer = b""
        self._parse_head(head, time, events)
        return offset + found.end() - buffered

    def _check_head_size(self, events: ParserEvents) -> None:
        if len(self.buffer) > self.max_head_bytes:
            self.counters.oversized_heads += 1
            self._lose_message(events)

    def _parse_head(self, head: bytes, time: float, events: ParserEvents) -> None:
        message = self.message
        assert message is not None
        message.size = len(head)
        message.head_end = message.position + len(head)
        lines = head.decode("latin-1").split("\n")
        start_line = lines[0].rstrip("\r")
        if self.is_request:
            parsed = REQUEST_LINE.fullmatch(start_line)
            if parsed is None:
                self._lose_message(events)
                return
            message.method, message.target, message.version = parsed.group(1), parsed.group(2), parsed.group(3)
        else:
            parsed = STATUS_LINE.fullmatch(start_line)
            if parsed is None:
                self._lose_message(events)
                return
            message.version, message.status = parsed.group(1), int(parsed.group(2))
        headers = message.headers
        for line in lines[1:]:
            line = line.rstrip("\r")
            if not line:
                continue
            if line[0] in " \t" and headers:  # obsolete line folding continues the previous header
                name, value = headers[-1]
                headers[-1] = (name, f"{value} {line.strip()}")
                continue
            name, colon, value = line.partition(":")
            if colon:
                headers.append((name.strip().lower(), value.strip()))
        events.append((HEAD_PARSED, message))
        self._start_body(time, events)

    def _start_body(self, time: float, events: ParserEvents) -> None:
        message = self.message
        assert message is not None
        if not self.is_request:
            status, method = message.status, self.method_of_response()
            if status < 200 or status in (204, 304) or method == "HEAD":
                self._complete(time, events)
                if status == 101:
                    self.state = TUNNEL
                return
            if method == "CONNECT" and status < 300:
                self._complete(time, events)
                self.state = TUNNEL
                return
        transfer_encoding = message.header("transfer-encoding")
        if transfer_encoding is not None and transfer_encoding.lower().rsplit(",", 1)[-1].strip() == "chunked":
            self.state = CHUNK_SIZE
            return
        length = content_length(message)
        if length is None and message.header("content-length") is not None or transfer_encoding is not None:
            self.counters.parse_errors += 1  # framing we cannot trust: the next start line tells where it ends
            if self.is_request:
                self._complete(time, events)
                self.state = RESYNC
                return
            length = None
        if length:
            self.state, self.remaining = BODY, length
        elif length == 0 or self.is_request:
            self._complete(time, events)
        else:
            self.state = UNTIL_CLOSE

    def _chunk_line(self, data: bytes, offset: int, time: float, events: ParserEvents) -> int:
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
            try:
                chunk_size = int(size_text, 16)
            except ValueError:
                chunk_size = -1
            if chunk_size < 0 or len(size_text) > 16:
                self.counters.parse_errors += 1
                message.damaged = True
                self.state = RESYNC
            elif chunk_size == 0:
                self.state = TRAILERS
            else:
                self.state, self.remaining = CHUNK_DATA, chunk_size
        elif state == CHUNK_END:
            if line:  # chunk data longer than announced: framing is lost
                self.counters.parse_errors += 1
                message.damaged = True
                self.state = RESYNC
            else:
                self.state = CHUNK_SIZE
        elif not line:  # the blank line that ends the trailers
            self._complete(time, events)
        return newline + 1

    def _resync(
        self, data: bytes, offset: int, time: float, position: int, peer_acked: int, events: ParserEvents
    ) -> int:
        window = self.buffer + data[offset:]
        window_position = position + offset - len(self.buffer)
        found = (REQUEST_START if self.is_request else RESPONSE_START).search(window)
        if found is None:
            kept = window[-RESYNC_KEEP:]
            self._skip(len(window) - len(kept))
            self.buffer = kept
            return len(data)
        self._skip(found.start())
        if self.message is not None:  # a body cut by a gap ends where the next message starts
            self._complete(time, events)
        self.buffer, self.state = b"", HEAD
        start_in_data = found.start() - (len(window) - (len(data) - offset))
        if start_in_data >= 0:
            return self._head(data, offset + start_in_data, time, position, peer_acked, events)
        # the start line began in the bytes kept from the previous segment
        self.message = Message(start_time=time, position=window_position + found.start())
        self.buffer = window[found.start() : len(window) - (len(data) - offset)]
        return self._continue_head(data, offset, time, events)

    def _skip(self, count: int) -> None:
        if self.message is not None:
            self.message.size += count
        else:
            self.counters.resync_skipped_bytes += count

    def _lose_message(self, events: ParserEvents) -> None:
        self.counters.parse_errors += 1
        events.append((MESSAGE_LOST, None))
        self.message, self.buffer, self.state = None, b"", RESYNC

    def _complete(self, time: float, events: ParserEvents) -> None:
        message = self.message
        assert message is not None
        message.end_time = time
        self.message, self.state = None, HEAD
        events.append((MESSAGE_COMPLETE, message))


def content_length(message: Message) -> int | None:
    """The body length, or None when absent or not a valid, unambiguous number."""
    values = {part.strip() for value in message.header_values("content-length") for part in value.split(",")}
    if len(values) != 1:
        return None
    value = values.pop()
    return int(value) if value.isdigit() and len(value) < 19 else None
