"""Capture files: pcap or pcapng, optionally gzip-compressed, read with dpkt."""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import dpkt

GZIP_MAGIC = b"\x1f\x8b"
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4",  # microsecond, either byte order
    b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",  # nanosecond
}


class CaptureError(Exception):
    """A capture that cannot be read at all; its message is one line meant for the user."""


MAX_RECORD = 1 << 20  # larger than any frame a capture holds (64 KiB super-frames): a corrupt length


class CaptureFile:
    """Iterates `(timestamp, linktype, frame)` over a capture file.

    A record cut short at the end of the file (a capture still being written, a truncated copy), or one
    with an impossible length, ends the iteration and is counted in `truncated_records` rather than
    raised: what came before it is good.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.truncated_records = 0
        self._stream = _open_decompressed(path)
        magic = self._stream.read(4)
        self._stream.seek(0)
        try:
            if magic == PCAPNG_MAGIC:
                self._reader = dpkt.pcapng.Reader(self._stream)
            elif magic in PCAP_MAGICS:
                self._reader = dpkt.pcap.Reader(self._stream)
            else:
                raise CaptureError(f"{path}: not a pcap or pcapng capture")
        except (ValueError, dpkt.UnpackError, EOFError, OSError, zlib.error) as error:
            raise CaptureError(f"{path}: unreadable capture header ({_one_line(error)})") from None
        self.linktype: int = self._reader.datalink()
        self._pcap_magic = magic if magic in PCAP_MAGICS else None

    def __iter__(self) -> Iterator[tuple[float, int, bytes]]:
        for batch in self.batches():
            yield from batch

    def batches(self, size: int = 8192) -> Iterator[list[tuple[float, int, bytes]]]:
        """Lists of frames, the pipeline's unit of work: a pcap's come a megabyte of file at a time, a
        pcapng's `size` frames at a time."""
        return self._pcap_batches() if self._pcap_magic else self._pcapng_batches(size)

    def _pcapng_batches(self, size: int) -> Iterator[list[tuple[float, int, bytes]]]:
        linktype = self.linktype
        batch: list[tuple[float, int, bytes]] = []
        try:
            for timestamp, frame in self._reader:
                batch.append((float(timestamp), linktype, frame))
                if len(batch) >= size:
                    yield batch
                    batch = []
        except (dpkt.UnpackError, ValueError, struct.error, EOFError, zlib.error, OSError):
            self.truncated_records += 1
        if batch:
            yield batch

    def _pcap_batches(self) -> Iterator[list[tuple[float, int, bytes]]]:
        """pcap records read a megabyte at a time: dpkt checked the file header, and its per-record objects
        would cost more than the rest of the pipeline does."""
        magic = self._pcap_magic
        record_header = struct.Struct(">IIII" if magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d") else "<IIII")
        divisor = 1e9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e6
        unpack_from, linktype, stream = record_header.unpack_from, self.linktype, self._stream
        stream.seek(24)
        buffer, offset = b"", 0
        try:
            while chunk := stream.read(1 << 20):
                buffer, offset = buffer[offset:] + chunk, 0
                end = len(buffer)
                batch = []
                while offset + 16 <= end:
                    seconds, fraction, length, _ = unpack_from(buffer, offset)
                    stop = offset + 16 + length
                    if length > MAX_RECORD:
                        self.truncated_records += 1
                        yield batch
                        return
                    if stop > end:
                        break
                    batch.append((seconds + fraction / divisor, linktype, buffer[offset + 16 : stop]))
                    offset = stop
                yield batch
        except (EOFError, zlib.error, OSError):  # a gzip stream cut short or corrupt
            self.truncated_records += 1
            return
        if offset < len(buffer):
            self.truncated_records += 1

    def close(self) -> None:
        self._stream.close()


def _open_decompressed(path: str) -> BinaryIO:
    try:
        raw = open(path, "rb")
    except OSError as error:
        raise CaptureError(f"{path}: cannot open ({error.strerror or _one_line(error)})") from None
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return io.BufferedReader(gzip.GzipFile(fileobj=raw), buffer_size=1 << 20)  # type: ignore[arg-type]
    raw.seek(0)
    return raw


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
