"""The packet rings outlive a restart: under a service manager with a file-descriptor store (systemd's
`FileDescriptorStoreMax=`), each ring's socket is left with the manager, which keeps it open while the
agent restarts. The kernel goes on filling the ring meanwhile; the next start takes the sockets over and
reads first what was captured while no agent ran. A stop reads through the block being filled and hands
those blocks back; past that boundary it reads on only to answer the requests in flight, and leaves those
blocks in the ring (`capture._drain`). The next run begins at the first block not handed back, so every
packet past the boundary is seen by it, and each request is billed by one run (`http/hand_over.rs`): a
restart loses nothing that the ring could hold, and what it could not hold is the kernel's drop count, in
the next run's summary. The answers the next run will see to the stopping run's requests are left beside
the ring, in the data directory (`leave_answers`), so that it does not take them for its own, with where
each client's next request begins, so that it reads the client in step from there.

A socket is taken over only if its name says it has the shape this run asks for (interface, link type,
ring size, retire period, number of workers); otherwise the stored ones are closed and new ones opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from agent.live.service_manager import ServiceManager
from agent.live.startup_checks import Link, socket_error
from agent.pipeline import HandedOver
from agent.source.packet_ring import BLOCK_BYTES, RETIRE_MS, PacketRing

log = logging.getLogger("agent.live")

PREFIX = "agent-ring"
METHODS = frozenset({"HEAD", "CONNECT", "OTHER"})  # what `answers_owed` names a request's method
MAX_ANSWERS_BYTES = 64 << 20  # an answers file larger than this is not one a stop left
MAX_WAITING = 1024  # requests one connection may have waiting (the core's MAX_PENDING)


def ring_names(link: Link, ring_bytes: int, workers: int) -> list[str]:
    """One name per worker's ring; the shape is hashed, since an interface's name may hold characters
    a descriptor's name may not."""
    shape = f"{link.interface}/{link.linktype}/{ring_bytes}/{BLOCK_BYTES}/{RETIRE_MS}/{workers}"
    digest = hashlib.sha256(shape.encode()).hexdigest()[:16]
    return [f"{PREFIX}-{number}-of-{workers}-{digest}" for number in range(1, workers + 1)]


class RingStore:
    """The rings' way through a restart: the descriptors the manager passed at this start, and the manager
    to leave this run's with (None when not run by one: rings are then opened anew and closed at the end)."""

    def __init__(self, manager: ServiceManager | None, inherited: dict[str, list[int]],
                 directory: Path | None = None) -> None:
        """`directory`: where the answers owed are left beside the rings (the data directory)."""
        self.manager = manager
        self.inherited = inherited
        self.directory = directory

    def can_take_over(self, names: list[str]) -> bool:
        """The manager kept one ring under each of `names` (a take-over is all of them or none)."""
        return all(len(self.inherited.get(name, ())) == 1 for name in names)

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
                # one taken over is in the store already (storing it again would only count against its limit)
                ring.kept_by_service_manager = ring.taken_over or self.manager.store(name, ring.fileno())
                if self.directory is not None:
                    ring.answers_path = self.directory / f"{name}.answers.json"
                    if not ring.taken_over:
                        _remove_stale(ring.answers_path)
        return rings

    def _take_over(self, link: Link, program: list[tuple[int, int, int, int]], ring_bytes: int,
                   names: list[str]) -> list[PacketRing] | None:
        if not self.can_take_over(names):
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


def _remove_stale(path: Path) -> None:
    """A previous ring's answers, which are not this one's."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("cannot remove %s (%s): a later take-over could apply it", path, error.strerror or error)


def leave_answers(ring: PacketRing, owed: list[HandedOver]) -> None:
    """Beside the ring, for the run that takes it over: the answers it will see to this run's requests."""
    if ring.answers_path is None:
        return
    text = json.dumps([[client.hex(), client_port, server.hex(), server_port, methods, resume, restarts]
                       for client, client_port, server, server_port, methods, resume, restarts in owed])
    temporary = ring.answers_path.with_suffix(".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, ring.answers_path)
    except OSError as error:
        log.warning("cannot leave the answers owed to this run's requests in %s (%s): the next run may pair "
                    "them with its own", ring.answers_path, error.strerror or error)


def take_answers(ring: PacketRing) -> list[HandedOver]:
    """What the previous run left beside the ring (see `leave_answers`), removed as it is read. A file that
    is not what `leave_answers` writes is said and ignored: the first answers on those connections may then
    be paired with this run's requests."""
    if ring.answers_path is None:
        return []
    try:
        with ring.answers_path.open("rb") as file:
            text = file.read(MAX_ANSWERS_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as error:
        log.warning("cannot read %s (%s): the first answers on the previous run's connections may be paired "
                    "with this run's requests", ring.answers_path, error.strerror or error)
        return []
    try:
        ring.answers_path.unlink()
    except OSError as error:  # read anyway; the next stop writes it anew
        log.warning("cannot remove %s (%s)", ring.answers_path, error.strerror or error)
    try:
        if len(text) > MAX_ANSWERS_BYTES:
            raise ValueError(f"larger than {MAX_ANSWERS_BYTES >> 20} MiB")
        return [_owed_answers(entry) for entry in json.loads(text)]
    except (ValueError, TypeError, RecursionError) as error:
        log.warning("ignoring %s, which is not what a stop leaves (%s): the first answers on the previous run's "
                    "connections may be paired with this run's requests", ring.answers_path,
                    type(error).__name__)
        return []


def _owed_answers(entry: object) -> HandedOver:
    """One connection of an answers file, checked (a ValueError or TypeError if it is not one)."""
    client, client_port, server, server_port, methods, resume, restarts = entry  # type: ignore[misc]
    addresses = bytes.fromhex(client), bytes.fromhex(server)
    ports = client_port, server_port
    if not all(len(address) in (4, 16) for address in addresses) or not all(
            type(port) is int and 0 <= port <= 0xFFFF for port in ports):
        raise ValueError("not a connection")
    if type(methods) is not list or len(methods) > MAX_WAITING or not all(method in METHODS for method in methods):
        raise ValueError("not a list of methods")
    if resume is not None and not (type(resume) is int and 0 <= resume <= 0xFFFF_FFFF):
        raise ValueError("not a sequence number")
    if not (type(restarts) is int and 0 <= restarts <= 0xFF):
        raise ValueError("not a count of restarts")
    return addresses[0], client_port, addresses[1], server_port, methods, resume, restarts


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
