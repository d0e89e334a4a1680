"""The kernel's packet ring: an AF_PACKET socket with a TPACKET_V3 memory-mapped receive ring.

The kernel fills whole blocks of packets and hands each block over by flipping its status word, so the
agent takes a block of thousands of packets per wake-up instead of one system call per packet. A block
that is not full is handed over anyway after `retire_ms`, so a quiet interface still delivers promptly.
Several sockets (`--workers N`) share the traffic in a PACKET_FANOUT group: hash by flow, IPv4
defragmented first. A socket alone joins none: a group's demultiplexing runs on every packet of the
interface, the gateway's whole loopback traffic included, and cost the gateway about 1 µs of CPU per
HTTPS request it served (scripts/bench_tls.py), whatever the mode. Alone, the kernel leaves IPv4
fragments as they came (the core counts them, `ip_fragments`; TCP sets Don't Fragment).
"""

from __future__ import annotations

from collections.abc import Callable

import errno
import select
import socket
import struct
from dataclasses import dataclass

from agent import _core
from agent.source import kernel_filter

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
ETH_P_ALL = 0x0003

PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000  # newer kernels: outgoing copies are not even cloned
PACKET_FANOUT_FLAG_DEFRAG = 0x8000

BLOCK_BYTES = 1 << 20  # bounds the largest frame: 64 KiB loopback super-frames and BIG TCP fit
FRAME_BYTES = 1 << 11  # only a bookkeeping unit in V3 (packets are packed), but it must divide the block
# A block not yet full is handed over after RETIRE_MS: that bounds the delay on a quiet interface, and the
# waste on a busy one, since a block handed over early holds less. Measured with two workers at the test
# gateway's peak: blocks 36% full on average at 20 ms, 75-87% at 100 ms.
RETIRE_MS = 100

RING_REQUEST = struct.Struct("=7I")  # struct tpacket_req3
STATISTICS = struct.Struct("=III")   # struct tpacket_stats_v3: packets (drops included), drops, freezes


@dataclass
class KernelStatistics:
    packets: int = 0    # handed to the ring after the filter, drops included
    drops: int = 0      # lost because the ring was full
    freezes: int = 0    # times the ring filled up


class PacketRing:
    """One socket, one ring: the socket is set up here, the ring is mapped and read by the core
    (`core_ring`, which the pipeline reads a block at a time without the GIL)."""

    def __init__(self, interface: str, linktype: int, program: list[tuple[int, int, int, int]],
                 ring_bytes: int, ignore_outgoing: bool = False, block_bytes: int = BLOCK_BYTES,
                 retire_ms: int = RETIRE_MS, inherited: int | None = None, bound: bool = True) -> None:
        """`bound`: the socket takes the interface's packets alone; else the ring is made, and takes its
        share from `join` on. With `inherited`, the descriptor of a socket a previous run set up with the
        same interface and ring shape (kept by the service manager): its ring is taken over, with what it
        captured meanwhile, and only the filter is replaced (the ports may have changed)."""
        self.interface = interface
        self.linktype = linktype
        self.block_bytes = block_bytes
        self.block_count = max(2, ring_bytes // block_bytes)
        self.retire_ms = retire_ms
        self.statistics = KernelStatistics()
        self.fanout_group = 0
        self.ignores_outgoing = False  # whether the kernel skips outgoing copies before even cloning them
        self.kept_by_service_manager = False  # a stop then leaves what is unread to the next start
        self.taken_over = inherited is not None  # from the previous run, with what it captured meanwhile
        self.answers_fd: int | None = None  # where the answers owed are left beside it (`ring_store.py`)
        self.core_ring: _core.Ring | None = None
        # Protocol 0: nothing arrives until bind(), so no unfiltered packet ever lands in the ring.
        self._socket = (socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) if inherited is None
                        else socket.socket(fileno=inherited))
        try:
            if inherited is None:
                self._setup(program)
                if bound:
                    self._socket.bind((self.interface, ETH_P_ALL))
                    if ignore_outgoing:
                        self._ignore_outgoing()
            else:
                self._take_over(program)
        except BaseException:
            self.close()
            raise
        self._other_backlog: Callable[[], float] | None = None
        self._poll = select.poll()
        self._poll.register(self._socket.fileno(), select.POLLIN | select.POLLERR)

    def _setup(self, program: list[tuple[int, int, int, int]]) -> None:
        sock = self._socket
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        kernel_filter.attach(sock, program)
        frames_per_block = self.block_bytes // FRAME_BYTES
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, RING_REQUEST.pack(
            self.block_bytes, self.block_count, FRAME_BYTES, frames_per_block * self.block_count,
            self.retire_ms, 0, 0))
        self.core_ring = _core.Ring(sock.fileno(), self.block_bytes, self.block_count, self.linktype)

    def join(self, fanout_group: int | None, ignore_outgoing: bool) -> None:
        """A ring made not `bound`: bound to the interface and in fanout group `fanout_group` (None: a new
        one), packets arrive from now on."""
        self._socket.bind((self.interface, ETH_P_ALL))
        self._join_fanout(fanout_group, ignore_outgoing)

    def _take_over(self, program: list[tuple[int, int, int, int]]) -> None:
        sock = self._socket
        if (sock.family, sock.type) != (socket.AF_PACKET, socket.SOCK_RAW) \
                or sock.getsockopt(SOL_PACKET, PACKET_VERSION) != TPACKET_V3:
            raise OSError(errno.EINVAL, "not a packet socket with a TPACKET_V3 ring")
        kernel_filter.attach(sock, program)
        # the kernel maps a ring only at its exact size, so a socket with a ring of another size fails here
        self.core_ring = _core.Ring(sock.fileno(), self.block_bytes, self.block_count, self.linktype)
        # id | type << 16 | flags >> 8 << 24, never 0 in a group (the agent's set DEFRAG; an id may be 0)
        fanout = sock.getsockopt(SOL_PACKET, PACKET_FANOUT)
        self.fanout_group = fanout & 0xFFFF
        self.ignores_outgoing = bool(fanout >> 24 & PACKET_FANOUT_FLAG_IGNORE_OUTGOING >> 8)
        if not fanout:
            try:
                self.ignores_outgoing = bool(sock.getsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING))
            except OSError:
                self.ignores_outgoing = False  # a kernel before 4.20

    def fileno(self) -> int:
        return self._socket.fileno()

    def replace_filter(self, program: list[tuple[int, int, int, int]]) -> None:
        kernel_filter.attach(self._socket, program)

    def _ignore_outgoing(self) -> None:
        """On loopback, where every packet also arrives: the kernel skips the outgoing copies before
        cloning them (Linux 4.20 and later; before, the filter drops them)."""
        try:
            self._socket.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self.ignores_outgoing = True
        except OSError:
            self.ignores_outgoing = False

    def _join_fanout(self, group: int | None, ignore_outgoing: bool) -> None:
        """Join `group`, or found a new one with an id the kernel picks (so two agents never share one)."""
        for ignore in (True, False) if ignore_outgoing else (False,):
            flags = PACKET_FANOUT_FLAG_DEFRAG | (PACKET_FANOUT_FLAG_IGNORE_OUTGOING if ignore else 0)
            if group is None:
                value = (PACKET_FANOUT_HASH | flags | PACKET_FANOUT_FLAG_UNIQUEID) << 16
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

    def also_wake_on(self, fd: int, backlog: Callable[[], float]) -> None:
        """Another ring read in the same loop (the TLS probes' ring buffer): `wait` also ends when `fd` is
        readable, and `ready_fraction` is the fuller one's (what the CPU-share watcher looks at)."""
        self._poll.register(fd, select.POLLIN)
        self._other_backlog = backlog

    def wait(self, timeout_ms: int) -> bool:
        """Until a block may be ready or the timeout passes; a signal ends the wait early enough."""
        return bool(self._poll.poll(timeout_ms))

    def next_block(self) -> list[tuple[float, int, bytes]] | None:
        """The frames of the next ready block as `(timestamp, linktype, frame)` (copies), or None if none
        is ready; the capture loop does not use it (the core reads the ring itself), tests do."""
        assert self.core_ring is not None
        return self.core_ring.next_block()

    @property
    def truncated(self) -> int:
        """Frames the kernel cut (larger than a block): counted, never silently short."""
        return self.core_ring.truncated if self.core_ring is not None else 0

    def ready_fraction(self) -> float:
        """How full the ring is: the share of blocks handed over and not yet read."""
        assert self.core_ring is not None
        own = self.core_ring.ready_fraction()
        return max(own, self._other_backlog()) if self._other_backlog is not None else own

    def pending_packets(self) -> int:
        """Packets in blocks handed over but not read yet (what a stop would leave unread)."""
        assert self.core_ring is not None
        return self.core_ring.pending_packets()

    def read_statistics(self) -> KernelStatistics:
        """The counts since the last call (the kernel resets them on read); also added to `statistics`."""
        packets, drops, freezes = STATISTICS.unpack(
            self._socket.getsockopt(SOL_PACKET, PACKET_STATISTICS, STATISTICS.size))
        self.statistics.packets += packets
        self.statistics.drops += drops
        self.statistics.freezes += freezes
        return KernelStatistics(packets, drops, freezes)

    def current_sequence(self) -> int:
        """The kernel's number of the block it opened last: once `read_through(n)` for this number, every
        packet captured before the call has been read."""
        assert self.core_ring is not None
        return self.core_ring.current_sequence()

    def leave_read_blocks(self) -> None:
        """From now on, blocks read stay handed over: the next reader of the socket reads them again."""
        assert self.core_ring is not None
        self.core_ring.leave_read_blocks()

    def read_through(self, sequence: int) -> bool:
        """Whether a block numbered `sequence` or later has been read."""
        assert self.core_ring is not None
        return self.core_ring.last_sequence >= sequence

    def close_socket(self) -> None:
        """Keep only the map (to watch how full the ring is, from another process)."""
        self._socket.close()

    def close(self) -> None:
        """Unmap and close; frames already returned are copies and stay valid."""
        if self.core_ring is not None:
            self.core_ring.close()
        self._socket.close()
