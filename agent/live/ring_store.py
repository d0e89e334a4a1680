"""The packet rings outlive a restart: under a service manager with a file-descriptor store (systemd's
`FileDescriptorStoreMax=`), each ring's socket is left with the manager, which keeps it open while the
agent restarts. The kernel goes on filling the ring meanwhile; the next start takes the sockets over and
reads first what was captured while no agent ran. A stop reads through the block being filled and hands
those blocks back; past that boundary it reads on only to answer the requests in flight, and leaves those
blocks in the ring (`capture._drain`). The next run begins at the first block not handed back, so every
packet past the boundary is seen by it, and each request is billed by one run (`http/hand_over.rs`): a
restart loses nothing that the ring could hold, and what it could not hold is the kernel's drop count, in
the next run's summary. The answers the next run will see to the stopping run's requests are left with
the manager too, in a memory file stored beside the ring (`leave_answers`), so that it does not take them
for its own, with where each client's next request begins, so that it reads the client in step from
there. Kept in memory by the manager, they need no disk: a full or read-only data directory cannot lose
them, and a ring not kept has none to leave. (Versions before kept them in the data directory, as
`<ring>.answers.json`: a run that takes over such a version's rings moves that file into the memory file
once, so an upgrade under traffic pairs as a restart does.)

A socket is taken over only if its name says it has the shape this run asks for (interface, link type,
ring size, retire period, number of workers); otherwise the stored ones are closed and new ones opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from agent.live.service_manager import ServiceManager
from agent.live.startup_checks import Link, check_ring_memory, socket_error
from agent.pipeline import HandedOver
from agent.source import kernel_filter
from agent.source.packet_ring import BLOCK_BYTES, RETIRE_MS, PacketRing

log = logging.getLogger("agent.live")

PREFIX = "agent-ring"
ANSWERS = "-answers"  # the name of a ring's answers file, after the ring's
METHODS = frozenset({"HEAD", "CONNECT", "OTHER"})  # what `answers_owed` names a request's method
RESUMES = frozenset({"message", "chunk-end", "chunk-size", "trailers"})  # and what a client is picked up in
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
                 data_dir: Path | None = None) -> None:
        """`data_dir`: where an earlier version left the answers owed (see the module's docstring)."""
        self.manager = manager
        self.inherited = inherited
        self.data_dir = data_dir

    def open(self, link: Link, program: list[tuple[int, int, int, int]], ring_bytes: int,
             workers: int) -> list[PacketRing]:
        """The rings of this run: taken over if the manager kept them with this shape, else new. Only new
        ones are checked against the memory available: a ring taken over is in use already, and counting it
        again would refuse the restart of a run the check let start (a restart loop)."""
        names = ring_names(link, ring_bytes, workers)
        rings = self._take_over(link, program, ring_bytes, names)
        kept = rings is not None and self.manager is not None
        answers = [self._kept_answers(name + ANSWERS) if kept else None for name in names]
        self._release_the_rest()
        if rings is None:
            check_ring_memory(ring_bytes, workers)
            rings = open_rings(link, program, ring_bytes, workers)
        if self.manager is not None:
            for name, ring in zip(names, rings):
                # one taken over is in the store already (storing it again would only count against its limit)
                ring.kept_by_service_manager = ring.taken_over or self.manager.store(name, ring.fileno())
            # the answers after every ring: a store too small for both (a unit from before they were kept
            # there) then loses answers, not rings
            for name, ring, kept_answers in zip(names, rings, answers):
                if ring.kept_by_service_manager:
                    ring.answers_fd = kept_answers if kept_answers is not None else self._new_answers(name + ANSWERS)
                if self.data_dir is not None:
                    _move_earlier_answers(self.data_dir / f"{name}.answers.json",
                                          ring.answers_fd if ring.taken_over and kept_answers is None else None)
        return rings

    def _kept_answers(self, name: str) -> int | None:
        """The answers file the previous run kept beside a ring taken over, if it is one (a memory file)."""
        fds = self.inherited.pop(name, [])
        if len(fds) == 1 and stat.S_ISREG(os.fstat(fds[0]).st_mode):
            return fds[0]
        for fd in fds:
            os.close(fd)
        if fds and self.manager is not None:
            log.warning("the answers kept beside the previous run's ring are not a file; ignored: the first answers "
                        "on its connections may be paired with this run's requests")
            self.manager.remove(name)
        return None

    def _new_answers(self, name: str) -> int | None:
        """A memory file for this ring's answers, left with the manager now: a stop only writes into it."""
        assert self.manager is not None
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        if self.manager.store(name, fd):
            return fd
        os.close(fd)
        return None

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


def leave_answers(ring: PacketRing, owed: list[HandedOver]) -> None:
    """Beside the ring, for the run that takes it over: the answers it will see to this run's requests."""
    if ring.answers_fd is None:
        return
    text = json.dumps([[client.hex(), client_port, server.hex(), server_port, methods, resume, restarts]
                       for client, client_port, server, server_port, methods, resume, restarts in owed]).encode()
    try:
        os.ftruncate(ring.answers_fd, 0)
        written = 0
        while written < len(text):
            written += os.pwrite(ring.answers_fd, text[written:], written)
    except OSError as error:  # (memory the host could not give)
        log.warning("cannot leave the answers owed to this run's requests (%s): the next run may pair them with "
                    "its own", error.strerror or error)


def _move_earlier_answers(path: Path, answers_fd: int | None) -> None:
    """An earlier version's answers file: into `answers_fd` (a ring it left, taken over), else stale; removed.
    Opened as root in a directory `--user` hands over: a link is not followed, nor anything but a file of
    its own read (a FIFO would block the start)."""
    try:
        if answers_fd is not None:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                status = os.fstat(fd)
                if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:  # (a hard link: another's file)
                    raise OSError("not a file of its own")
                os.pwrite(answers_fd, file.read(MAX_ANSWERS_BYTES + 1), 0)  # (a memory file just made: empty)
    except FileNotFoundError:
        return
    except OSError as error:  # (ELOOP: a link)
        log.warning("ignoring the answers an earlier version left in %s (%s): the first answers on its "
                    "connections may be paired with this run's requests", path, error.strerror or error)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("cannot remove %s, the answers an earlier version left (%s)", path, error.strerror or error)


def take_answers(ring: PacketRing) -> list[HandedOver]:
    """What the previous run left beside the ring (see `leave_answers`), emptied before it is parsed, so
    that no start meets it twice. What is not what `leave_answers` writes is said and ignored: the first
    answers on those connections may then be paired with this run's requests."""
    if ring.answers_fd is None:
        return []
    try:
        text = b""
        while len(text) <= MAX_ANSWERS_BYTES:
            piece = os.pread(ring.answers_fd, MAX_ANSWERS_BYTES + 1 - len(text), len(text))
            if not piece:
                break
            text += piece
        os.ftruncate(ring.answers_fd, 0)
    except OSError as error:
        log.warning("cannot read the answers the previous run left (%s): the first answers on its connections may "
                    "be paired with this run's requests", error.strerror or error)
        return []
    if not text:
        return []
    try:
        if len(text) > MAX_ANSWERS_BYTES:
            raise ValueError(f"larger than {MAX_ANSWERS_BYTES >> 20} MiB")
        return [_owed_answers(entry) for entry in json.loads(text)]
    except (ValueError, TypeError, RecursionError) as error:
        log.warning("ignoring the answers the previous run left, which are not what a stop leaves (%s): the first "
                    "answers on its connections may be paired with this run's requests", type(error).__name__)
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
    if type(resume) is int:
        resume = resume, "message"  # (an earlier version's: a client was picked up in step at a message only)
    if resume is not None:
        seq, into = resume
        if not (type(seq) is int and 0 <= seq <= 0xFFFF_FFFF) or into not in RESUMES:
            raise ValueError("not a sequence number and what begins there")
        resume = seq, into
    if not (type(restarts) is int and 0 <= restarts <= 0xFF):
        raise ValueError("not a count of restarts")
    return addresses[0], client_port, addresses[1], server_port, methods, resume, restarts


def open_rings(link: Link, program: list[tuple[int, int, int, int]], ring_bytes: int,
               workers: int) -> list[PacketRing]:
    """One new ring per worker, several in one fanout group; opened before any privilege is dropped.

    A group spreads the flows over the sockets it has, so as each joins, the flows move: a connection whose
    request went to the first ring alone could have its response in the second. So several rings are all
    made first (a ring's memory takes a while to set up), then joined at once, taking nothing until the
    last has joined; then all get the capture filter (each connection starts in the one ring it stays in,
    mid-connection for those under way, as at any start)."""
    rings: list[PacketRing] = []
    try:
        if workers == 1:
            rings.append(PacketRing(link.interface, link.linktype, program, ring_bytes,
                                    ignore_outgoing=link.loopback))
            return rings
        for _ in range(workers):
            rings.append(PacketRing(link.interface, link.linktype, kernel_filter.REJECT_ALL, ring_bytes,
                                    bound=False))
        first = rings[0]
        first.join(None, link.loopback)
        for ring in rings[1:]:
            ring.join(first.fanout_group, first.ignores_outgoing)
        for ring in rings:
            ring.replace_filter(program)
    except OSError as error:
        for ring in rings:
            ring.close()
        raise socket_error(link.interface, error) from None
    return rings
