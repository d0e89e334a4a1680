"""Capture files: pcap or pcapng, optionally gzip-compressed, cut into records by hand with struct.

Both formats are read a megabyte at a time: a library's per-record objects would cost more than the rest
of the pipeline, and dpkt's pcapng reader decodes every packet with the first interface's link type and
skips what it does not know without a word. Whatever cannot be read is counted in `truncated_records`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from struct import Struct, unpack_from

from agent.source.file_bytes import READ_ERRORS, NotARegularFile, decompressed_chunks, open_regular_file
from agent.source.frames import SUPPORTED_LINK_TYPES, SUPPORTED_LINKS

log = logging.getLogger(__name__)


PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4",  # microsecond, either byte order
    b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",  # nanosecond
}
PCAP_BIG_ENDIAN = (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d")
PCAP_NANOSECONDS = (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
PCAP_HEADER = 24

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"  # a section header block's type, the same in either byte order
PCAPNG_BYTE_ORDERS = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
BLOCK_SHB, BLOCK_IDB, BLOCK_PB, BLOCK_SPB, BLOCK_EPB = 0x0A0D0D0A, 1, 2, 3, 6
OPTION_END, OPTION_TSRESOL, OPTION_TSOFFSET = 0, 9, 14

MAX_RECORD = 1 << 20  # larger than any frame a capture holds (64 KiB super-frames): a corrupt length
MAX_BLOCK = 16 << 20  # pcapng blocks besides packets (name tables, TLS secrets) may be larger, not this large
LAST_SECOND = 253402300800  # 10000-01-01T00:00:00Z: no datetime holds a packet time from here on

Frame = tuple[float, int, bytes]  # (timestamp, linktype, frame)


class CaptureError(Exception):
    """A capture that cannot be read at all; its message is one line meant for the user."""


class CaptureFile:
    """Iterates `(timestamp, linktype, frame)` over a capture file.

    A record cut short at the end of the file (a capture still being written, a truncated copy), damaged
    compressed data, or a record with an impossible length ends the iteration; a packet that cannot be
    used on its own (no timestamp, one no date can hold, an interface never described) is skipped. Each is
    counted in `truncated_records` rather than raised (what came before is good), and logged by kind with
    its count once the file has been read.
    """

    def __init__(self, path: str, report_losses: bool = True) -> None:
        self.path = path
        self.report_losses = report_losses  # False in all but one of several workers reading the same file
        self.truncated_records = 0
        self._losses: dict[str, int] = {}  # why -> how many records
        try:
            self._file = open_regular_file(path)
        except NotARegularFile:
            raise CaptureError(f"{path}: not a regular file; --read takes a pcap or pcapng file (optionally .gz)"
                               ) from None
        except OSError as error:
            raise CaptureError(f"{path}: cannot open ({error.strerror or _one_line(error)})") from None
        self._chunks = decompressed_chunks(self._file)
        self._buffer, self._offset, self._exhausted = b"", 0, False
        try:
            while len(self._buffer) < PCAP_HEADER and (chunk := next(self._chunks, None)) is not None:
                self._buffer += chunk
        except READ_ERRORS as error:
            self.close()
            raise CaptureError(f"{path}: unreadable capture ({_one_line(error)})") from None
        magic = self._buffer[:4]
        self._pcapng = magic == PCAPNG_MAGIC
        try:
            if magic in PCAP_MAGICS:
                link_types = self._open_pcap(magic)
            elif self._pcapng:
                link_types = self._open_pcapng()
            else:
                raise CaptureError(f"{path}: not a pcap or pcapng capture")
            if link_types and not SUPPORTED_LINK_TYPES.intersection(link_types):
                raise CaptureError(
                    f"{path}: link type {link_types[0]} is not one the agent decodes ({SUPPORTED_LINKS})")
        except CaptureError:
            self.close()
            raise

    def __iter__(self) -> Iterator[Frame]:
        for batch in self.batches():
            yield from batch

    def batches(self, size: int = 8192) -> Iterator[list[Frame]]:
        """Lists of frames, the pipeline's unit of work: a pcap's come a megabyte of file at a time, a
        pcapng's `size` frames at a time."""
        return self._pcapng_batches(size) if self._pcapng else self._pcap_batches()

    def close(self) -> None:
        self._file.close()

    def _open_pcap(self, magic: bytes) -> list[int]:
        if len(self._buffer) < PCAP_HEADER:
            raise CaptureError(f"{self.path}: unreadable capture (the file ends inside its header)")
        order = ">" if magic in PCAP_BIG_ENDIAN else "<"
        self._pcap_record = Struct(order + "IIII")
        self._pcap_divisor = 1e9 if magic in PCAP_NANOSECONDS else 1e6
        self._pcap_linktype = unpack_from(order + "I", self._buffer, 20)[0] & 0xFFFF  # bits above: FCS length
        self._offset = PCAP_HEADER
        return [self._pcap_linktype]

    def _pcap_batches(self) -> Iterator[list[Frame]]:
        """The per-packet loop of a replay: everything it needs is a local."""
        unpack_record, linktype, divisor = self._pcap_record.unpack_from, self._pcap_linktype, self._pcap_divisor
        while True:
            buffer, offset = self._buffer, self._offset
            end = len(buffer)
            batch = []
            while offset + 16 <= end:
                seconds, fraction, length, _ = unpack_record(buffer, offset)
                stop = offset + 16 + length
                if length > MAX_RECORD:
                    self._give_up(f"a record claims {length} bytes")
                    break
                if stop > end:
                    break
                batch.append((seconds + fraction / divisor, linktype, buffer[offset + 16 : stop]))
                offset = stop
            self._offset = offset
            if batch:
                yield batch
            if not self._read_more():
                self._log_losses()
                return

    def _open_pcapng(self) -> list[int]:
        """Reads up to the first packet, so that the interfaces described before it can be checked."""
        if self._buffer[8:12] not in PCAPNG_BYTE_ORDERS:
            raise CaptureError(f"{self.path}: unreadable capture (a pcapng file without its byte-order magic)")
        self._interfaces: list[tuple[int, float, int]] = []  # (linktype, ticks per second, seconds added)
        self._order = PCAPNG_BYTE_ORDERS[self._buffer[8:12]]
        self._first: list[Frame] = []
        while not self._parse_blocks(self._first, 1) and self._read_more():
            pass
        return [linktype for linktype, _, _ in self._interfaces]

    def _pcapng_batches(self, size: int) -> Iterator[list[Frame]]:
        batch, self._first = self._first, []
        while True:
            if self._parse_blocks(batch, size):
                yield batch
                batch = []
            elif not self._read_more():
                break
        if batch:
            yield batch
        self._log_losses()

    def _parse_blocks(self, batch: list[Frame], size: int) -> bool:
        """Turn the buffer's complete blocks into frames appended to `batch`; True once it holds `size`."""
        buffer, offset, order = self._buffer, self._offset, self._order
        end = len(buffer)
        while offset + 12 <= end and not self._exhausted:
            kind = unpack_from(order + "I", buffer, offset)[0]
            if kind == BLOCK_SHB:  # a new section: its own byte order and interface numbering
                order = PCAPNG_BYTE_ORDERS.get(buffer[offset + 8 : offset + 12], "")
                if not order:
                    self._give_up("a section header without its byte-order magic")
                    break
                self._order = order
            length = unpack_from(order + "I", buffer, offset + 4)[0]
            if length < 12 or length % 4 or length > MAX_BLOCK:
                self._give_up(f"a block claims {length} bytes")
                break
            if offset + length > end:
                break
            body, stop = offset + 8, offset + length - 4
            if unpack_from(order + "I", buffer, stop)[0] != length:
                self._give_up("a block whose two lengths differ")
                break
            offset += length
            if kind == BLOCK_EPB or kind == BLOCK_PB:
                if stop - body < 20:
                    self._lose("packet blocks too short for their header")
                    continue
                if kind == BLOCK_EPB:
                    interface, high, low, captured = unpack_from(order + "IIII", buffer, body)
                else:  # the obsolete Packet Block: a 16-bit interface id, then a drop count
                    interface, high, low, captured = unpack_from(order + "H2xIII", buffer, body)
                if interface >= len(self._interfaces):
                    self._lose("packets of an interface the file never described")
                    continue
                if captured > stop - body - 20:
                    self._lose("packet blocks shorter than the packet they hold")
                    continue
                linktype, ticks_per_second, seconds_added = self._interfaces[interface]
                timestamp = seconds_added + (high << 32 | low) / ticks_per_second
                if not 0 <= timestamp < LAST_SECOND:
                    self._lose("packet times before 1970 or after 9999")
                    continue
                batch.append((timestamp, linktype, buffer[body + 20 : body + 20 + captured]))
                if len(batch) >= size:
                    break
            elif kind == BLOCK_IDB:
                if stop - body < 8:
                    self._give_up("an interface description too short for its header")
                    break
                self._interfaces.append(_interface(buffer, body, stop, order))
            elif kind == BLOCK_SPB:
                self._lose("Simple Packet Blocks, which carry no timestamp")
            elif kind == BLOCK_SHB:
                self._interfaces = []
            # other blocks (statistics, name resolution, secrets, custom) carry no packets
        self._offset = offset
        return len(batch) >= size

    def _read_more(self) -> bool:
        """Append the file's next chunk to what is left of the buffer. False at the end of the file, after
        counting how it ended if not cleanly (damaged, or cut inside a record)."""
        if self._exhausted:
            return False
        try:
            chunk = next(self._chunks, None)
        except READ_ERRORS as error:
            self._give_up(f"unreadable from here on ({_one_line(error)})")
            return False
        if chunk is None:
            self._exhausted = True
            if self._offset < len(self._buffer):
                self._lose("the file ends inside a record")
            return False
        self._buffer, self._offset = self._buffer[self._offset :] + chunk, 0
        return True

    def _give_up(self, reason: str) -> None:
        """Stop reading: nothing after this point can be trusted to start where a record starts."""
        self._lose(reason + "; the rest of the file is not read")
        self._exhausted = True

    def _lose(self, reason: str) -> None:
        """Count a record that cannot be used."""
        self.truncated_records += 1
        self._losses[reason] = self._losses.get(reason, 0) + 1

    def _log_losses(self) -> None:
        """Why records were lost, once per kind: the summary line only has their number. Logged after
        reading, not as they happen, so that opening the file to check it logs nothing."""
        for reason, count in self._losses.items() if self.report_losses else ():
            log.warning("%s: %d record%s skipped: %s", self.path, count, "" if count == 1 else "s", reason)


def _interface(buffer: bytes, body: int, stop: int, order: str) -> tuple[int, float, int]:
    """An interface description's link type and how its packets count time (microseconds unless an option
    says otherwise)."""
    linktype = unpack_from(order + "H", buffer, body)[0]
    ticks_per_second, seconds_added = 1e6, 0
    position = body + 8
    while position + 4 <= stop:
        code, length = unpack_from(order + "HH", buffer, position)
        value = position + 4
        if code == OPTION_END or value + length > stop:
            break
        if code == OPTION_TSRESOL and length >= 1:
            exponent = buffer[value]  # the high bit chooses powers of two over powers of ten
            ticks_per_second = float(2 ** (exponent & 0x7F) if exponent & 0x80 else 10 ** exponent)
        elif code == OPTION_TSOFFSET and length >= 8:
            seconds_added = unpack_from(order + "q", buffer, value)[0]
        position = value + length + (-length % 4)
    return linktype, ticks_per_second, seconds_added


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
