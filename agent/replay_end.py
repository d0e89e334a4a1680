"""How a replay ends, whichever way: stopped by SIGINT or SIGTERM, given up on a silent ingest endpoint, or
read to the end of a file that may be damaged. Each way ends with the summary line and, where events
remain in the spool, the line that says how many and that the next start sends them; the exit status
tells the ways apart:

- 0: every event written (acknowledged, for an ingest endpoint) from a clean capture;
- 1: events left in the spool (the endpoint was down, refused them, or the replay gave up) or refused as
  invalid into the dead-letter file;
- 3: the capture is damaged (records cut short, corrupt or unreadable, or packets the capture cut short
  with its snap length or that cannot be decoded): every event that could be read was written, the
  summary counts the lost records and packets in `corrupt_packets` (the packets cut by the snap length
  apart, in `cut_short_packets`), and a warning line names each cause with its count;
- 130 / 143: stopped by SIGINT / SIGTERM (128 + the signal's number, as a shell reports it).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from agent import logs
from agent.sink import Sink
from agent.sink.ingest import IngestSink

log = logging.getLogger("agent.replay")

EXIT_UNDELIVERED = 1
EXIT_DAMAGED = 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DAMAGED_RECORDS = "damaged_records"  # a worker's counter, for the exit status; not on the summary line
WHOLE_FRAMES = 65535  # a snap length below this cuts frames a gateway sends (loopback's MTU is 64 KiB)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `counters` are what the pipeline had counted by then, when it was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.counters: dict[str, int] | None = None

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within, the first SIGINT or SIGTERM raises `Interrupted` wherever the main thread is: reading the
    capture, or waiting for the endpoint. Later ones are ignored, so that the stop itself (closing the
    sink, the summary) is not cut short; the stop never waits for the endpoint. Forked workers inherit it."""

    def interrupt(signum: int, frame: object) -> None:
        ignore_stop_signals()
        raise Interrupted(signum)

    previous = {stop_signal: signal.signal(stop_signal, interrupt) for stop_signal in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


def ignore_stop_signals() -> None:
    """The replay is ending already: a stop signal now would only cut its summary short."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Within, a stop signal waits (blocked) and arrives once this ends: a message to the parent is never cut
    in half by `Interrupted`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_waiting(sink: Sink) -> None:
    """After a stop or giving up: writes no longer wait for room in the spool."""
    if isinstance(sink, IngestSink):
        sink.stop_waiting()


def close_without_waiting(sink: Sink) -> None:
    """What the endpoint has not acknowledged stays in the spool, for the next start."""
    if isinstance(sink, IngestSink):
        sink.close(wait_for_ack=False)
    else:
        sink.close()


def finish(path: str, counters: dict[str, int], delivery: dict[str, int], *, exit_when_spooled: bool,
           stop: Interrupted | None = None, gave_up: str | None = None, snap_length: int | None = None) -> int:
    """Print the summary and what is left where; returns the exit status. `snap_length`: the one the
    capture file declares, if any (it names the cause of packets cut short)."""
    damaged = counters.pop(DAMAGED_RECORDS, 0)
    cut_short = counters.get("cut_short_packets", 0)
    undecodable = counters.get("corrupt_packets", 0) - damaged
    logs.summary({**counters, **delivery})
    if cut_short:
        log.warning("%s", cut_short_warning(path, cut_short, snap_length))
    if undecodable:
        log.warning("%s: %s could not be decoded (link, IP or TCP headers cut or inconsistent) and %s skipped:"
                    " what %s carried is lost", path, _packets(undecodable), _were(undecodable),
                    "it" if undecodable == 1 else "they")
    if gave_up:
        logs.error(f"{gave_up}; the replay stopped before the end of {path}")
    if damaged:
        logs.error(f"{path} is damaged: {damaged} record{'' if damaged == 1 else 's'} could not be read;"
                   " every event that could be was written")
    pending = delivery.get("pending", 0)
    if pending and (not exit_when_spooled or stop is not None or gave_up):
        logs.error(f"{pending} events are still in the spool, not yet acknowledged; the next start sends them")
    if stop is not None:
        return stop.exit_status
    if (pending and not exit_when_spooled) or gave_up:
        return EXIT_UNDELIVERED
    if delivery.get("dead_lettered"):
        logs.error(f"the ingest endpoint refused {delivery['dead_lettered']} events as invalid; they are"
                   " in the dead-letter file, not delivered")
        return EXIT_UNDELIVERED
    return EXIT_DAMAGED if damaged or cut_short or undecodable else 0


def cut_short_warning(path: str, count: int, snap_length: int | None) -> str:
    """The line that says `count` packets were cut short when captured, naming the snap length when it is
    the likely cause."""
    if snap_length is not None and snap_length < WHOLE_FRAMES:
        cause = f"by the capture's snap length ({snap_length} bytes)"
    else:
        cause = "when captured (the file holds less of each than was on the wire)"
    return (f"{path}: {_packets(count)} {_were(count)} cut short {cause}: their bytes are lost;"
            " capture whole frames (tcpdump -s 0)")


def _packets(count: int) -> str:
    return f"{count} packet{'' if count == 1 else 's'}"


def _were(count: int) -> str:
    return "was" if count == 1 else "were"
