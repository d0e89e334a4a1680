"""The bytes of a capture file, a megabyte at a time, inflated when it is gzip-compressed.

Only a regular file is read: a replay reads it more than once (a check, then each worker), and opening a
FIFO without a writer would block. Damaged or cut-short gzip data raises only after everything before the
damage was handed over, so that the capture reader can keep the good records and count the rest.
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Iterator
from typing import BinaryIO

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip header and checks the trailer's CRC and length
GZIP_PIECE = 16 << 10  # compressed bytes inflated per call: what damage there costs, beyond the damage itself
READ_ERRORS = (EOFError, zlib.error, OSError)  # gzip cut short or damaged; the disk failing


class NotARegularFile(OSError):
    """The path names something other than a regular file (a FIFO, a directory, a device)."""


def open_regular_file(path: str) -> BinaryIO:
    """Opened non-blocking (a FIFO without a writer would block the open itself) and checked before any read."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NotARegularFile(path)
    return os.fdopen(descriptor, "rb", buffering=0)


def decompressed_chunks(file: BinaryIO) -> Iterator[bytes]:
    """The file's bytes, about a megabyte at a time, inflated if it is gzip."""
    data = file.read(CHUNK)
    if data.startswith(GZIP_MAGIC):
        yield from _inflated_chunks(file, data)
        return
    while data:
        yield data
        data = file.read(CHUNK)


def _inflated_chunks(file: BinaryIO, data: bytes) -> Iterator[bytes]:
    """Damaged or cut-short gzip raises only after what came before the damage was yielded: zlib drops the
    output of a call that fails, so it gets small pieces (GzipFile loses the whole buffer it was filling).
    A call inflates at most a megabyte, however compressible the data."""
    inflated: list[bytes] = []
    size = 0
    decompressor = None
    try:
        while data:
            view, position = memoryview(data), 0
            while position < len(data):
                if decompressor is None:
                    decompressor = zlib.decompressobj(GZIP_WBITS)
                piece = view[position : position + GZIP_PIECE]
                output = decompressor.decompress(piece, CHUNK)
                position += len(piece) - len(decompressor.unconsumed_tail) - len(decompressor.unused_data)
                if decompressor.eof:  # a member ended; another may follow (concatenated gzip files)
                    decompressor = None
                inflated.append(output)
                size += len(output)
                if size >= CHUNK:
                    yield b"".join(inflated)
                    inflated, size = [], 0
            data = file.read(CHUNK)
        if decompressor is not None:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
    except (EOFError, zlib.error):
        yield b"".join(inflated)
        raise
    yield b"".join(inflated)
