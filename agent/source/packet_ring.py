"""The kernel's packet ring: an AF_PACKET socket with a TPACKET_V3 memory-mapped receive ring.

The kernel fills whole blocks of packets and hands each block over by flipping its status word, so the
agent takes a block of thousands of packets per wake-up instead of one system call per packet. A block
that is not full is handed over anyway after `retire_ms`, so a quiet interface still delivers promptly.
Every socket joins a PACKET_FANOUT group (hash by flow, IPv4 defragmented first), also when it is alone,
so one worker or several see the same packets the same way.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
from dataclasses import dataclass

from agent.source import kernel_filter

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
TPACKET_V3 = 2
ETH_P_ALL = 0x0003

PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000  # newer kernels: outgoing copies are not even cloned
PACKET_FANOUT_FLAG_DEFRAG = 0x8000

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1

BLOCK_BYTES = 1 << 20  # bounds the largest frame: 64 KiB loopback super-frames and BIG TCP fit
FRAME_BYTES = 1 << 11  # only a bookkeeping unit in V3 (packets are packed), but it must divide the block
# A block not yet full is handed over after RETIRE_MS: that bounds the delay on a quiet interface, and the
# waste on a busy one, since a block handed over early holds less. Measured with two workers at the test
# gateway's peak: blocks 36% full on average at 20 ms, 75-87% at 100 ms.
RETIRE_MS = 100

# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status, num_pkts,
# offset_to_first_pkt, ...
BLOCK_HEADER = struct.Struct("=8xIII")
BLOCK_STATUS_OFFSET = 8
# struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, ...
PACKET_HEADER = struct.Struct("=IIIII4xH")
RING_REQUEST = struct.Struct("=7I")  # struct tpacket_req3
STATISTICS = struct.Struct("=III")   # struct tpacket_stats_v3: packets (drops included), drops, freezes


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def map_ring(fd: int, size: int) -> ctypes.Array:
    """mmap through libc rather than the mmap module, which keeps a duplicate of the socket's descriptor:
    the map alone is what a watching process keeps. Slicing the array copies bytes out, as fast."""
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address in (None, MAP_FAILED):
        error = ctypes.get_errno()
        raise OSError(error, f"cannot map a {size >> 20} MiB ring: {os.strerror(error)}; try a smaller --ring-mb")
    return (ctypes.c_char * size).from_address(address)


@dataclass
class KernelStatistics:
    packets: int = 0    # handed to the ring after the filter, drops included
    drops: int = 0      # lost because the ring was full
    freezes: int = 0    # times the ring filled up


class PacketRing:
    """One socket, one ring. `next_block()` copies a ready block's frames out and gives the block back."""

    def __init__(self, interface: str, linktype: int, program: list[tuple[int, int, int, int]],
                 ring_bytes: int, fanout_group: int | None = None, ignore_outgoing: bool = False,
                 block_bytes: int = BLOCK_BYTES, retire_ms: int = RETIRE_MS) -> None:
        self.interface = interface
        self.linktype = linktype
        self.block_bytes = block_bytes
        self.block_count = max(2, ring_bytes // block_bytes)
        self.retire_ms = retire_ms
        self.statistics = KernelStatistics()
        self.truncated = 0  # frames the kernel cut (larger than a block): counted, never silently short
        self.fanout_group = 0
        self.ignores_outgoing = False  # whether the kernel skips outgoing copies before even cloning them
        self._block = 0
        self._ring: ctypes.Array | None = None
        # Protocol 0: nothing arrives until bind(), so no unfiltered packet ever lands in the ring.
        self._socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            self._setup(program, fanout_group, ignore_outgoing)
        except BaseException:
            self.close()
            raise
        self._poll = select.poll()
        self._poll.register(self._socket.fileno(), select.POLLIN | select.POLLERR)

    def _setup(self, program: list[tuple[int, int, int, int]], fanout_group: int | None,
               ignore_outgoing: bool) -> None:
        sock = self._socket
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        kernel_filter.attach(sock, program)
        frames_per_block = self.block_bytes // FRAME_BYTES
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, RING_REQUEST.pack(
            self.block_bytes, self.block_count, FRAME_BYTES, frames_per_block * self.block_count,
            self.retire_ms, 0, 0))
        self._ring = map_ring(sock.fileno(), self.block_bytes * self.block_count)
        sock.bind((self.interface, ETH_P_ALL))
        self._join_fanout(fanout_group, ignore_outgoing)

    def _join_fanout(self, group: int | None, ignore_outgoing: bool) -> None:
        """Join `group`, or found a new one with an id the kernel picks (so two agents never share one)."""
        for ignore in (True, False) if ignore_outgoing else (False,):
            flags = PACKET_FANOUT_FLAG_DEFRAG | (PACKET_FANOUT_FLAG_IGNORE_OUTGOING if ignore else 0)
            if group is None:
                value = PACKET_FANOUT_HASH | (flags | PACKET_FANOUT_FLAG_UNIQUEID) << 16
            else:
                value = group | (PACKET_FANOUT_HASH | flags) << 16
            try:
                self._socket.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("=I", value))
            except OSError:
                if ignore:
                    continue  # an older kernel: the filter drops the outgoing copies instead
                raise
            self.fanout_group = self._socket.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
            self.ignores_outgoing = ignore
            return

    @property
    def ring_bytes(self) -> int:
        return self.block_bytes * self.block_count

    def wait(self, timeout_ms: int) -> bool:
        """Until a block may be ready or the timeout passes; a signal ends the wait early enough."""
        return bool(self._poll.poll(timeout_ms))

    def next_block(self) -> list[tuple[float, int, bytes]] | None:
        """The frames of the next ready block as `(timestamp, linktype, frame)`, or None if none is ready."""
        ring = self._ring
        assert ring is not None
        offset = self._block * self.block_bytes
        status, count, position = BLOCK_HEADER.unpack_from(ring, offset)
        if not status & TP_STATUS_USER:
            return None
        linktype = self.linktype
        unpack = PACKET_HEADER.unpack_from
        frames: list[tuple[float, int, bytes]] = []
        append = frames.append
        position += offset
        truncated = 0
        for _ in range(count):
            next_offset, seconds, nanoseconds, captured, length, mac = unpack(ring, position)
            start = position + mac
            frame: bytes = ring[start : start + captured]  # type: ignore[assignment]  # c_char slices are bytes
            append((seconds + nanoseconds * 1e-9, linktype, frame))
            truncated += captured != length
            position += next_offset
        struct.pack_into("=I", ring, offset + BLOCK_STATUS_OFFSET, TP_STATUS_KERNEL)
        self._block = (self._block + 1) % self.block_count
        self.truncated += truncated
        return frames

    def ready_fraction(self) -> float:
        """How full the ring is: the share of blocks handed over and not yet read."""
        ring = self._ring
        assert ring is not None
        unpack, size = BLOCK_HEADER.unpack_from, self.block_bytes
        ready = sum(1 for index in range(self.block_count) if unpack(ring, index * size)[0] & TP_STATUS_USER)
        return ready / self.block_count

    def pending_packets(self) -> int:
        """Packets in blocks handed over but not read yet (what a stop would leave unread)."""
        ring = self._ring
        assert ring is not None
        total = 0
        for index in range(self.block_count):
            status, count, _ = BLOCK_HEADER.unpack_from(ring, index * self.block_bytes)
            if status & TP_STATUS_USER:
                total += count
        return total

    def read_statistics(self) -> KernelStatistics:
        """The counts since the last call (the kernel resets them on read); also added to `statistics`."""
        packets, drops, freezes = STATISTICS.unpack(
            self._socket.getsockopt(SOL_PACKET, PACKET_STATISTICS, STATISTICS.size))
        self.statistics.packets += packets
        self.statistics.drops += drops
        self.statistics.freezes += freezes
        return KernelStatistics(packets, drops, freezes)

    def stop_capturing(self) -> None:
        """Let no further packet in; blocks already filled (and the one being filled) can still be read."""
        kernel_filter.attach(self._socket, kernel_filter.drop_all())

    def close_socket(self) -> None:
        """Keep only the map (to watch how full the ring is, from another process)."""
        self._socket.close()

    def close(self) -> None:
        """Unmap and close; frames already returned are copies and stay valid."""
        ring, self._ring = self._ring, None
        if ring is not None:
            _libc.munmap(ctypes.addressof(ring), ctypes.sizeof(ring))
        self._socket.close()
