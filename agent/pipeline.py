"""The stages wired together: frames in, events out. Still no I/O: sources and sinks stay at the edges."""

from __future__ import annotations

import gc
from collections.abc import Iterable

import orjson

from agent.http.exchanges import HttpExchanges
from agent.metering.meter import Meter
from agent.source.frames import FrameDecoder
from agent.tcp.reassembly import ReassemblyLimits, TcpReassembler

HOUSEKEEPING_INTERVAL = 1.0  # seconds of capture time between idle and response-timeout sweeps


def tune_garbage_collector() -> None:
    """Collect cycles a hundred times less often than Python's default (every 700 allocations).

    The pipeline allocates a few objects per packet and frees nearly all of them by reference counting
    (none of its per-packet objects form cycles), so the default mostly walks live objects in vain: it
    costs a tenth of a replay's time. Cycles are still collected, so memory stays bounded.
    """
    gc.set_threshold(100_000, 50, 100)


class Pipeline:
    def __init__(self, ports: set[int], meter: Meter, limits: ReassemblyLimits | None = None,
                 response_timeout: float = 60.0, max_head_bytes: int = 65536) -> None:
        self.decoder = FrameDecoder()
        self.reassembler = TcpReassembler(ports, limits)
        self.http = HttpExchanges(response_timeout, max_head_bytes)
        self.meter = meter
        self.packets = 0
        self.last_time = 0.0
        self._next_housekeeping = 0.0

    def feed(self, frames: Iterable[tuple[float, int, bytes]]) -> bytes:
        """Process a batch of frames; returns the events it completed, as JSON Lines."""
        decode = self.decoder.decode
        reassemble = self.reassembler.feed
        to_http = self.http.feed
        packets = 0
        time = self.last_time
        for time, linktype, frame in frames:
            packets += 1
            segment = decode(linktype, frame)
            if segment is None:
                continue
            if time >= self._next_housekeeping:
                self._housekeeping(time)
            stream_events = reassemble(time, segment)
            if stream_events:
                to_http(stream_events)
        self.packets += packets
        self.last_time = max(self.last_time, time)
        return self._events()

    def tick(self, now: float) -> bytes:
        """Let time pass without packets (a quiet live interface): expire what has waited too long."""
        self._housekeeping(now)
        return self._events()

    def finish(self) -> bytes:
        """The capture is over: close every connection, so requests still in flight are emitted too."""
        self.http.feed(self.reassembler.close_all(self.last_time))
        return self._events()

    def _events(self) -> bytes:
        """The events metered so far as JSON Lines, the form every sink and worker pipe takes (and the core's
        pipeline returns)."""
        dumps = orjson.dumps
        return b"".join(dumps(event) + b"\n" for event in self.meter.meter(self.http.take()))

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        self.http.feed(self.reassembler.expire(now))
        self.http.expire(now)

    def counters(self) -> dict[str, int]:
        """Everything counted along the way, by stage; the summary line is made from it."""
        tcp = self.reassembler.counters
        parser = self.http.parser_counters
        http = self.http.counters
        meter = self.meter.counters
        return {
            "packets": self.packets,
            "connections": tcp.connections,
            "requests": http.requests,
            "events": meter.events,
            "rejected": meter.rejected,
            "unresolved": meter.unresolved,
            "unanswered": http.unanswered,
            "gaps": tcp.gaps,
            "gap_bytes": tcp.gap_bytes,
            "lost_exchanges": http.lost_exchanges,
            "parse_errors": parser.parse_errors,
            "corrupt_packets": self.decoder.counters.corrupt,
            "unsupported_link": self.decoder.counters.unsupported_link,  # frames lost; not_tcp is filtered, not lost
            "unmatched_responses": http.unmatched_responses,
            "late_responses": http.late_responses,
            "duplicate_segments": tcp.duplicate_segments,
            "oversized_heads": parser.oversized_heads,
            "pending_overflows": tcp.pending_overflows,
            "unpaired_overflows": http.unpaired_overflows,
            "expired_connections": tcp.expired_connections,
            "evicted_connections": tcp.evicted_connections,
            "ip_fragments": self.decoder.counters.fragments,
            "held_overflow": meter.held_overflow,
        }


def summary_line(counters: dict[str, int]) -> str:
    return "summary: " + " ".join(f"{name}={value}" for name, value in counters.items())



