"""The packet rings outlive a restart: under a service manager with a file-descriptor store (systemd's
`FileDescriptorStoreMax=`), each ring's socket is left with the manager, which keeps it open while the
agent restarts. The kernel goes on filling the ring meanwhile; the next start takes the sockets over and
reads first what was captured while no agent ran. A stop reads through the block being filled and no
further (`capture._drain`), and a block is handed back to the kernel once read, so each packet is read by
one run: a restart loses nothing that the ring could hold, and what it could not hold is the kernel's drop
count, in the next run's summary.

A socket is taken over only if its name says it has the shape this run asks for (interface, link type,
ring size, retire period, number of workers); otherwise the stored ones are closed and new ones opened.
"""

from __future__ import annotations

import hashlib
import logging
import os

from agent.live.service_manager import ServiceManager
from agent.live.startup_checks import Link, socket_error
from agent.source.packet_ring import BLOCK_BYTES, RETIRE_MS, PacketRing

log = logging.getLogger("agent.live")

PREFIX = "agent-ring"


def ring_names(link: Link, ring_bytes: int, workers: int) -> list[str]:
    """One name per worker's ring; the shape is hashed, since an interface's name may hold characters
    a descriptor's name may not."""
    shape = f"{link.interface}/{link.linktype}/{ring_bytes}/{BLOCK_BYTES}/{RETIRE_MS}/{workers}"
    digest = hashlib.sha256(shape.encode()).hexdigest()[:16]
    return [f"{PREFIX}-{number}-of-{workers}-{digest}" for number in range(1, workers + 1)]


class RingStore:
    """The rings' way through a restart: the descriptors the manager passed at this start, and the manager
    to leave this run's with (None when not run by one: rings are then opened anew and closed at the end)."""

    def __init__(self, manager: ServiceManager | None, inherited: dict[str, list[int]]) -> None:
        self.manager = manager
        self.inherited = inherited

    def open(self, link: Link, program: list[tuple[int, int, int, int]], ring_bytes: int,
             workers: int) -> list[PacketRing]:
        """The rings of this run: taken over if the manager kept them with this shape, else new."""
        names = ring_names(link, ring_bytes, workers)
        rings = self._take_over(link, program, ring_bytes, names)
        self._release_the_rest()
        if rings is None:
            rings = open_rings(link, program, ring_bytes, workers)
        if self.manager is not None:
            for name, ring in zip(names, rings):
                ring.kept_by_service_manager = self.manager.store(name, ring.fileno())
        return rings

    def _take_over(self, link: Link, program: list[tuple[int, int, int, int]], ring_bytes: int,
                   names: list[str]) -> list[PacketRing] | None:
        if not all(len(self.inherited.get(name, ())) == 1 for name in names):
            if any(name.startswith(PREFIX) for name in self.inherited):
                log.warning("the rings kept from the previous run have another shape (interface, --ring-mb or "
                            "--workers changed); opening new ones: what they captured since is not read")
            return None
        rings: list[PacketRing] = []
        try:
            for name in names:
                rings.append(PacketRing(link.interface, link.linktype, program, ring_bytes,
                                        inherited=self.inherited.pop(name)[0]))
        except OSError as error:
            for ring in rings:
                ring.close()
            for name in names:  # the manager's copies too: new rings are stored under these names
                if self.manager is not None:
                    self.manager.remove(name)
            log.warning("cannot take over the rings kept from the previous run (%s); opening new ones: what they "
                        "captured since is not read", error.strerror or error)
            return None
        waiting = sum(ring.pending_packets() for ring in rings)
        dropped = sum(ring.read_statistics().drops for ring in rings)
        log.info("took over %d ring(s) from the previous run: %d packets captured meanwhile are read first",
                 len(rings), waiting)
        if dropped:
            log.warning("the kernel dropped %d packets while no agent ran, the ring being full (counted in "
                        "kernel_drops); a larger --ring-mb holds a longer restart", dropped)
        return rings

    def _release_the_rest(self) -> None:
        """What was passed and is not taken over is closed; stored rings of another shape also leave the
        manager, which would otherwise keep them filling."""
        for name, fds in self.inherited.items():
            for fd in fds:
                os.close(fd)
            if name.startswith(PREFIX) and self.manager is not None:
                self.manager.remove(name)
        self.inherited = {}


def open_rings(link: Link, program: list[tuple[int, int, int, int]], ring_bytes: int,
               workers: int) -> list[PacketRing]:
    """One new ring per worker, all in one fanout group; opened before any privilege is dropped."""
    rings: list[PacketRing] = []
    try:
        for _ in range(workers):
            first = rings[0] if rings else None
            rings.append(PacketRing(
                link.interface, link.linktype, program, ring_bytes,
                fanout_group=first.fanout_group if first else None,
                ignore_outgoing=first.ignores_outgoing if first else link.loopback))
    except OSError as error:
        for ring in rings:
            ring.close()
        raise socket_error(link.interface, error) from None
    return rings
