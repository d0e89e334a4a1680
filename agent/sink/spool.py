"""Durable, bounded spool of events waiting for the ingest endpoint's acknowledgement.

Format, chosen to survive `kill -9` with nothing but append and rename:
- `spool-000001.jsonl`, `spool-000002.jsonl`, ...: append-only segments, one event per line (compact JSON,
  never containing a raw newline). A segment is closed once it passes the segment size and never written
  again; a restarted spool always starts a new segment, so old ones are only ever read.
- `acked.json`: the position (segment, byte offset) up to which everything was acknowledged (or
  dead-lettered), replaced atomically by rename. A segment wholly behind it is deleted.
- `spool.lock`: an flock held while a spool is open, so two agents never share one spool (the kernel drops
  it when a process dies, even by `kill -9`).

Recovery: an event whose write was cut short by a kill leaves a last line without its newline; it is
detected (the segment does not end in a newline), logged, and truncated away. It is never an event the
caller was told was accepted: `append` returns only after the whole write. A missing or unreadable ack file
means "start from the oldest segment": events are re-sent, which the ingest side de-duplicates.

Durability: `append` writes to the kernel before it returns, so `kill -9` loses nothing accepted. Disk
writes are forced (fsync) in batches, every `fsync_interval` seconds and when a segment closes, so a power
cut can lose at most the events accepted in the last `fsync_interval` that were not yet delivered. The ack
file is not fsynced: after a power cut some delivered events may be sent again (de-duplicated there).

The bound `max_bytes` is on the segment files' size on disk. A segment is reclaimed when all of it is
acknowledged, so up to one segment (1/16th of the bound) can be acknowledged bytes still waiting to be freed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from agent.sink.datadir import ensure_private_dir

log = logging.getLogger("agent.sink.spool")

SEGMENT_PREFIX = "spool-"
SEGMENT_SUFFIX = ".jsonl"
ACK_FILE = "acked.json"
LOCK_FILE = "spool.lock"
MAX_SEGMENT_BYTES = 64 << 20
MIN_SEGMENT_BYTES = 4096
FULL_WAIT_SECONDS = 1.0


class SpoolBusy(RuntimeError):
    """Another process has this spool open."""


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


@dataclass
class Batch:
    """Lines read together, acknowledged together; `end` is where the next read starts."""

    lines: list[bytes]
    end: Position
    unreadable: list[bytes] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.lines) + len(self.unreadable)


def looks_like_event(line: bytes) -> bool:
    """A cheap check that a line is a whole JSON object, catching disk damage without parsing every event."""
    return line[:1] == b"{" and line[-1:] == b"}" and b"\x00" not in line


class Spool:
    """Append from one thread (the pipeline), read and acknowledge from another (delivery)."""

    def __init__(self, directory: Path, max_bytes: int, *, fsync_interval: float = 1.0) -> None:
        if max_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"spool bound {max_bytes} bytes is below the minimum of {MIN_SEGMENT_BYTES}")
        self.directory = ensure_private_dir(Path(directory))
        self.max_bytes = max_bytes
        self.segment_bytes = max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, max_bytes // 16))
        self._lock_fd = self._take_lock()
        self._cond = threading.Condition()
        self._segments: dict[int, int] = {}  # segment number -> committed size, ascending
        self._used = 0
        self._pending = 0  # accepted, not yet acknowledged
        self._unread = 0  # accepted, not yet handed to delivery
        self._oldest_unread_at: float | None = None
        self._wake_at = 1
        self._wakes = 0
        self._no_waiting = False
        self._dirty = False
        self._closed = False
        self._full_since: float | None = None
        self._write_error: str | None = None
        self._ack_error: str | None = None
        self._reader: tuple[int, BinaryIO] | None = None
        self.recovered_events = 0
        self.truncated_bytes = 0
        start = self._recover()
        self._active = max([*self._segments, start.segment, 0]) + 1
        self._fd = self._create_segment(self._active)
        self._acked = self._read = start if self._segments else Position(self._active, 0)
        self._segments[self._active] = 0
        self._fsync_interval = fsync_interval
        self._stop_sync = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
        self._syncer.start()

    # -- the pipeline side ------------------------------------------------------------------------

    def append(self, lines: bytes, *, block: bool, give_up: Callable[[], bool] | None = None) -> int:
        """Append JSON Lines (whole lines, each ending in a newline), as they are and in order; return how many
        lines were refused (0 when all were kept: counted only when some were not).

        With `block`, waits for room (acknowledgements free it) until all are kept, the spool closes or
        `give_up()` says so; without, stops at the first line that does not fit and leaves the rest to the
        caller.
        """
        if lines and not lines.endswith(b"\n"):
            raise ValueError("JSON Lines must end with a newline")
        if len(lines) > self.max_bytes and any(len(line) + 1 > self.max_bytes for line in lines.split(b"\n")):
            raise ValueError("an event is larger than the whole spool")
        data = memoryview(lines)
        start = 0
        with self._cond:
            while start < len(lines) and not self._closed:
                end = self._fitting(lines, start)
                if end == start:
                    self._note_full()
                    if not block or self._no_waiting or (give_up is not None and give_up()):
                        break
                    self._cond.wait(FULL_WAIT_SECONDS)
                    continue
                try:
                    self._write(data[start:end])
                except OSError as exc:
                    self._note_write_error(exc)
                    if not block or self._no_waiting or (give_up is not None and give_up()):
                        break
                    self._cond.wait(FULL_WAIT_SECONDS)
                    continue
                self._note_room()
                self._accepted(lines.count(b"\n", start, end))
                start = end
                if self._segments[self._active] >= self.segment_bytes:
                    self._try_rotate()
        return lines.count(b"\n", start) if start < len(lines) else 0

    def _fitting(self, lines: bytes, start: int) -> int:
        """Where the whole lines from `start` that fit in the bound and (one line at least) in the active
        segment end, reclaiming the active segment first when it is fully acknowledged; `start` when none fit."""
        first_end = lines.index(b"\n", start) + 1
        room = self.max_bytes - self._used
        if first_end - start > room and self._active_fully_acked() and self._try_rotate():
            room = self.max_bytes - self._used
        if first_end - start > room:
            return start
        limit = start + min(room, self.segment_bytes - self._segments[self._active])
        if limit >= len(lines):
            return len(lines)
        return max(first_end, lines.rfind(b"\n", start, limit) + 1)

    def _write(self, data: memoryview) -> None:
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            if written:  # never leave half a line in the middle of a segment
                os.ftruncate(self._fd, self._segments[self._active])
            raise
        self._segments[self._active] += len(data)
        self._used += len(data)
        self._dirty = True

    def _accepted(self, count: int) -> None:
        before = self._unread
        self._pending += count
        self._unread += count
        if before == 0:
            self._oldest_unread_at = time.monotonic()
        if before == 0 or before < self._wake_at <= self._unread:
            self._cond.notify_all()

    def _note_full(self) -> None:
        if self._full_since is None:
            self._full_since = time.monotonic()
            self._cond.notify_all()
            log.warning("spool %s is full (%d of %d bytes): no room for new events until the endpoint"
                        " acknowledges some", self.directory, self._used, self.max_bytes)

    def _note_write_error(self, exc: OSError) -> None:
        message = exc.strerror or str(exc)
        if message != self._write_error:
            self._write_error = message
            log.error("cannot write to spool %s: %s", self.directory, message)

    def _note_room(self) -> None:
        if self._full_since is not None:
            log.warning("spool has room again after %.1f s full", time.monotonic() - self._full_since)
            self._full_since = None
        if self._write_error is not None:
            log.warning("spool %s is writable again", self.directory)
            self._write_error = None

    # -- the delivery side ------------------------------------------------------------------------

    def wait_ready(self, batch_size: int, max_age: float, timeout: float) -> bool:
        """Wait until a batch is due: `batch_size` unread events, unread ones `max_age` seconds old, or any
        unread one while the spool is full; False after `timeout` or a `wake()`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._wake_at = batch_size
            wakes = self._wakes
            while True:
                now = time.monotonic()
                if self._unread >= batch_size or (self._unread and self._full_since is not None):
                    return True  # a full spool cannot wait for a fuller batch
                wait = deadline - now
                if self._unread and self._oldest_unread_at is not None:
                    due = self._oldest_unread_at + max_age
                    if now >= due:
                        return True
                    wait = min(wait, due - now)
                if wait <= 0 or self._closed or self._wakes != wakes:
                    return False
                self._cond.wait(wait)

    def read_batch(self, max_events: int) -> Batch | None:
        """The next unread lines, up to `max_events`; None when there are none."""
        if self._closed:
            return None
        lines: list[bytes] = []
        unreadable: list[bytes] = []
        pos = self._read
        while len(lines) + len(unreadable) < max_events:
            with self._cond:
                segment = next((n for n in self._segments if n >= pos.segment), None)
                if segment is None:
                    break
                if segment != pos.segment:
                    pos = Position(segment, 0)
                end = self._segments[segment]
                active = segment == self._active
            if pos.offset >= end:
                if active:
                    break
                pos = Position(segment + 1, 0)
                continue
            reader = self._reader_for(segment)
            reader.seek(pos.offset)
            offset = pos.offset
            while offset < end and len(lines) + len(unreadable) < max_events:
                line = reader.readline(end - offset)
                if not line:
                    break
                offset += len(line)
                body = line[:-1] if line.endswith(b"\n") else line
                (lines if looks_like_event(body) else unreadable).append(body)
            pos = Position(segment, offset)
        count = len(lines) + len(unreadable)
        if count == 0:
            return None
        with self._cond:
            self._read = pos
            self._unread -= count
            self._oldest_unread_at = 0.0 if self._unread else None
        return Batch(lines, pos, unreadable)

    def rewind(self) -> None:
        """Read again from the last acknowledged event: a batch that was read but whose delivery failed
        unexpectedly is delivered again, not skipped."""
        with self._cond:
            self._read = self._acked
            self._unread = self._pending
            self._oldest_unread_at = time.monotonic() if self._unread else None
            reader, self._reader = self._reader, None
        if reader is not None:
            reader[1].close()

    def ack(self, batch: Batch) -> None:
        """Everything up to `batch.end` is delivered (or dead-lettered): free it, remember it."""
        with self._cond:
            if self._closed:
                return
            self._acked = batch.end
            self._pending -= batch.size
            self._delete_finished()
            self._cond.notify_all()
        try:
            self._write_ack_file(batch.end)
            self._ack_error = None
        except OSError as exc:  # only costs re-sends after a restart
            if self._ack_error != str(exc):
                self._ack_error = str(exc)
                log.error("cannot record acknowledgements in %s: %s", self.directory, exc.strerror or exc)

    def wait_empty(self, timeout: float) -> bool:
        """Wait until every accepted event is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._cond.wait(remaining)
        return True

    def stop_waiting_for_room(self) -> None:
        """Nobody will free room any more (delivery stopped): appends that would wait give up instead."""
        with self._cond:
            self._no_waiting = True
            self._cond.notify_all()

    def wake(self) -> None:
        """End every wait now, so a waiter sees a change of plan (flush, stop) at once."""
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    # -- state --------------------------------------------------------------------------------------

    @property
    def bytes_used(self) -> int:
        return self._used

    @property
    def pending_events(self) -> int:
        return self._pending

    def oldest_pending(self) -> bytes | None:
        """The first event not yet acknowledged, read from disk (for monitoring its age), or None when there
        is none. A file of its own, not the delivery thread's reader."""
        with self._cond:
            if self._closed or not self._pending:
                return None
            acked = self._acked
            segments = [(number, size) for number, size in self._segments.items() if number >= acked.segment]
        for number, size in segments:
            offset = acked.offset if number == acked.segment else 0
            if offset >= size:
                continue
            try:
                with open(self._segment_path(number), "rb") as segment:
                    segment.seek(offset)
                    return segment.readline(min(size - offset, MAX_SEGMENT_BYTES)).rstrip(b"\n")
            except FileNotFoundError:  # acknowledged and reclaimed meanwhile
                continue
        return None

    @property
    def is_full(self) -> bool:
        return self._full_since is not None

    def sync(self) -> None:
        """Force accepted events to disk (what a power cut cannot take back).

        The fsync runs on a duplicate of the descriptor, outside the lock, so the pipeline keeps appending
        meanwhile (a rotation may close the original)."""
        with self._cond:
            if not self._dirty or self._closed:
                return
            fd = os.dup(self._fd)
            self._dirty = False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Force everything to disk and release the spool; what is unacknowledged stays for the next start."""
        self._stop_sync.set()
        with self._cond:
            if self._closed:
                return
            os.fsync(self._fd)
            os.close(self._fd)
            if self._reader is not None:
                self._reader[1].close()
            for number, size in list(self._segments.items()):
                if self._pending == 0 or (number == self._active and size == 0):
                    self._remove_segment(number)
            self._closed = True
            self._cond.notify_all()
        if self._pending:
            log.info("%d undelivered events kept in spool %s for the next start", self._pending, self.directory)
        os.close(self._lock_fd)

    # -- segments -----------------------------------------------------------------------------------

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{SEGMENT_PREFIX}{number:06d}{SEGMENT_SUFFIX}"

    def _create_segment(self, number: int) -> int:
        fd = os.open(self._segment_path(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name itself must survive a power cut
        finally:
            os.close(dir_fd)
        return fd

    def _try_rotate(self) -> bool:
        """Close the active segment for good and start the next one; on failure keep appending to it."""
        try:
            new_fd = self._create_segment(self._active + 1)
        except OSError as exc:
            self._note_write_error(exc)
            return False
        old_fd, self._fd = self._fd, new_fd
        self._active += 1
        self._segments[self._active] = 0
        self._dirty = False
        try:
            os.fsync(old_fd)
        except OSError as exc:
            self._note_write_error(exc)
        finally:
            os.close(old_fd)
        self._delete_finished()
        return True

    def _active_fully_acked(self) -> bool:
        size = self._segments[self._active]
        return size > 0 and self._acked >= Position(self._active, size)

    def _delete_finished(self) -> None:
        for number, size in list(self._segments.items()):
            if number == self._active or Position(number, size) > self._acked:
                break
            self._remove_segment(number)

    def _remove_segment(self, number: int) -> None:
        """The reader may still hold the file open: it is the delivery thread's alone, and moves on to the
        next segment by itself (an unlinked file stays readable until then)."""
        self._used -= self._segments.pop(number)
        self._segment_path(number).unlink(missing_ok=True)

    def _reader_for(self, number: int) -> BinaryIO:
        """Only the delivery thread (read_batch) calls this, and close() once it has stopped."""
        reader = self._reader
        if reader is None or reader[0] != number:
            if reader is not None:
                reader[1].close()
            reader = self._reader = (number, open(self._segment_path(number), "rb"))
        return reader[1]

    def _write_ack_file(self, position: Position) -> None:
        temporary = self.directory / (ACK_FILE + ".tmp")
        temporary.write_text(json.dumps({"segment": position.segment, "offset": position.offset}))
        os.replace(temporary, self.directory / ACK_FILE)

    def _sync_loop(self) -> None:
        while not self._stop_sync.wait(self._fsync_interval):
            try:
                self.sync()
            except OSError as exc:
                log.error("cannot fsync spool %s: %s", self.directory, exc.strerror or exc)

    # -- recovery -----------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(f"spool {self.directory} is in use by another agent") from None
        return fd

    def _read_ack_file(self) -> Position | None:
        path = self.directory / ACK_FILE
        try:
            saved = json.loads(path.read_text())
            return Position(int(saved["segment"]), int(saved["offset"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("unreadable %s: re-sending the whole spool (the ingest side de-duplicates)", path)
            return None

    def _recover(self) -> Position:
        """Load the segments left by an earlier run; return where unacknowledged events start."""
        acked = self._read_ack_file()
        numbers = sorted(
            int(path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)])
            for path in self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")
            if path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)].isdigit()
        )
        for number in numbers:
            path = self._segment_path(number)
            if acked is not None and number < acked.segment:
                path.unlink()
                continue
            self._segments[number] = self._trim_partial_line(path)
        self._used = sum(self._segments.values())
        if acked is not None and acked.segment in self._segments:
            if acked.offset > self._segments[acked.segment]:  # the events past the end were acknowledged
                log.warning("%s points past the end of segment %d: that segment is shorter than when it was"
                            " acknowledged (a power cut, or edited by hand)", ACK_FILE, acked.segment)
            start = Position(acked.segment, min(acked.offset, self._segments[acked.segment]))
        else:
            start = Position(next(iter(self._segments), acked.segment if acked else 0), 0)
        self.recovered_events = self._count_lines_from(start)
        self._pending = self._unread = self.recovered_events
        self._oldest_unread_at = 0.0 if self._unread else None
        if self.recovered_events:
            log.info("spool %s holds %d undelivered events from an earlier run", self.directory, self._unread)
        return start

    def _trim_partial_line(self, path: Path) -> int:
        """Cut a last line left without its newline by a killed write; return the segment's size."""
        size = path.stat().st_size
        with open(path, "rb") as segment:
            end = size
            while end > 0:
                start = max(0, end - 65536)
                segment.seek(start)
                newline = segment.read(end - start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
        if end < size:
            log.warning("spool %s: dropped %d bytes of an event whose write was cut short", path.name, size - end)
            os.truncate(path, end)
            self.truncated_bytes += size - end
        return end

    def _count_lines_from(self, start: Position) -> int:
        count = 0
        for number, size in self._segments.items():
            if number < start.segment:
                continue
            with open(self._segment_path(number), "rb") as segment:
                segment.seek(start.offset if number == start.segment else 0)
                while chunk := segment.read(1 << 20):
                    count += chunk.count(b"\n")
        return count
