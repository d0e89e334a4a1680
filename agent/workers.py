"""Child processes (live and replay workers, the CPU-share watcher) and what workers tell their parent.

Children are forked, never outlive their parent, and leave through `os._exit` so that nothing inherited
(a sink's buffer, an open file) is flushed or closed twice. A worker sends its events as they come, each
batch one message of JSON Lines, and its counters last; the parent hands the events, as they are, to the one
sink.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import orjson

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def fork(run: Callable[[], int], on_parent_death: int = signal.SIGKILL) -> int:
    """Start `run()` in a child process; returns its pid. The child gets `on_parent_death` if the parent dies."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, on_parent_death)
        except (OSError, AttributeError):
            pass  # not Linux's libc: the parent stops its children itself
        if os.getppid() == parent:  # else the parent died before the prctl took effect
            code = run()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports the stop
        code = 130
    except BaseException as error:  # noqa: BLE001 - a child must never unwind into its parent's code
        log.error("child process failed: %s: %s", type(error).__name__, " ".join(str(error).split()))
    finally:
        os._exit(code)


def spawn(count: int, work: Callable[[int, Connection], int]) -> dict[Connection, int]:
    """Fork `count` workers, each running `work(its index, the pipe to the parent)`; returns the parent's
    ends of the pipes, each with its worker's pid. A worker keeps only its own pipe's writing end. One whose
    parent dies has nowhere to send its events: it ends at once, leaving what it has not read in the ring
    (for the next run, when the ring is kept), rather than reading on for nothing."""
    children: dict[Connection, int] = {}
    for index in range(count):
        reader, writer = Pipe(duplex=False)
        earlier = list(children)

        def run(index: int = index, reader: Connection = reader, writer: Connection = writer,
                earlier: list[Connection] = earlier) -> int:
            reader.close()
            for connection in earlier:
                connection.close()
            return work(index, writer)

        children[reader] = fork(run)
        writer.close()
    return children


COUNTERS = b"C"  # marks a worker's last message, its counters
PROGRESS = b"P"  # marks a live worker's report for monitoring; every other message is events as JSON Lines


def send_events(connection: Connection, lines: bytes) -> None:
    """Events as JSON Lines (each a JSON object, so never starting with COUNTERS), sent as they are."""
    connection.send_bytes(lines)


def send_counters(connection: Connection, counters: dict[str, int]) -> None:
    connection.send_bytes(COUNTERS + orjson.dumps(counters))


def send_progress(connection: Connection, report: dict) -> None:
    connection.send_bytes(PROGRESS + orjson.dumps(report))


def receive(message: bytes, totals: dict[str, int],
            progress: Callable[[dict], None] | None = None) -> bytes | None:
    """The events (JSON Lines) a message carries, or None for a worker's counters (added into `totals`) or
    its report (handed to `progress`)."""
    if message[:1] == PROGRESS:
        if progress is not None:
            progress(orjson.loads(message[1:]))
        return None
    if message[:1] != COUNTERS:
        return message
    for name, value in orjson.loads(message[1:]).items():
        totals[name] = totals.get(name, 0) + value
    return None
