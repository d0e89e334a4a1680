"""What is checked before live capture starts, each with one clear line for the operator.

Errors (the capture cannot work): the interface does not exist, its link type is not one the frame
decoder reads, no permission for a packet socket. A warning only: nothing listens on the gateway port
yet (the gateway may start after the agent). Otherwise the listening process is named, so a wrong
`--port` shows at a glance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent._core import DLT_EN10MB, CaptureError

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ARPHRD_NONE = 0xFFFE  # tun devices, WireGuard: raw IP, no link header
DLT_RAW = 101


class LiveCaptureError(CaptureError):
    """Live capture cannot start; the message is one line meant for the user."""


@dataclass(frozen=True)
class Link:
    """How frames of an interface look: the decoder's link type and the link header before IP."""

    interface: str
    linktype: int
    header_length: int
    loopback: bool


def interface_link(name: str) -> Link:
    interfaces = psutil.net_if_stats()
    if name not in interfaces:
        raise LiveCaptureError(f"no interface {name!r}; this host has: {', '.join(sorted(interfaces))}")
    if not interfaces[name].isup:
        log.warning("interface %s is down; capturing anyway", name)
    try:
        arphrd = int(Path("/sys/class/net", name, "type").read_text())
    except (OSError, ValueError):
        raise LiveCaptureError(f"cannot read the link type of {name}") from None
    if arphrd == ARPHRD_LOOPBACK:
        return Link(name, DLT_EN10MB, 14, loopback=True)
    if arphrd == ARPHRD_ETHER:
        return Link(name, DLT_EN10MB, 14, loopback=False)
    if arphrd == ARPHRD_NONE:
        return Link(name, DLT_RAW, 0, loopback=False)
    raise LiveCaptureError(f"{name}: link type {arphrd} is not supported (Ethernet, loopback or raw IP are)")


def check_ring_memory(ring_bytes: int, workers: int) -> None:
    """The rings are kernel memory that cannot be swapped out: refuse what would starve the host."""
    total = ring_bytes * workers
    available = psutil.virtual_memory().available
    if total > available // 2:
        raise LiveCaptureError(f"{workers} x {ring_bytes >> 20} MiB of ring is more than half the memory available "
                               f"({available >> 20} MiB); give a smaller --ring-mb")


def socket_error(interface: str, error: OSError) -> LiveCaptureError:
    """The one line for a packet socket or ring that could not be set up."""
    if isinstance(error, PermissionError):
        return LiveCaptureError(
            f"no permission to capture on {interface}: run as root or grant CAP_NET_RAW "
            "(setcap cap_net_raw+ep on the Python interpreter)")
    reason = error.strerror or str(error)
    return LiveCaptureError(f"cannot capture on {interface}: {reason}")


def report_listeners(ports: set[int]) -> None:
    """Log who listens on each gateway port, or warn that nobody does yet."""
    try:
        listeners = listening_pids(ports)
    except (psutil.Error, OSError) as error:
        log.warning("cannot list listening sockets (%s); capturing anyway", type(error).__name__)
        return
    for port in sorted(ports):
        pids = listeners[port]
        if not pids:
            log.warning("nothing is listening on port %d yet; capturing anyway", port)
            continue
        log.info("port %d: %s", port, describe_listener(pids))


def listening_pids(ports: set[int]) -> dict[int, set[int | None]]:
    """For each port, the processes listening on it (None: not visible to this user); psutil.Error or
    OSError when the sockets cannot be listed."""
    listeners: dict[int, set[int | None]] = {port: set() for port in ports}
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port in ports:
            listeners[connection.laddr.port].add(connection.pid)
    return listeners


def describe_listener(pids: set[int | None]) -> str:
    """The process behind a listening socket, climbing from a worker to its master (nginx, Kong)."""
    known = sorted(pid for pid in pids if pid is not None)
    if not known:
        return "listening (process not visible to this user)"
    try:
        process = psutil.Process(known[0])
        for _ in range(8):  # bounded: a master's parent is init or a shell, never the same program
            parent = process.parent()
            if parent is None or parent.pid <= 1 or parent.name() != process.name():
                break
            process = parent
    except psutil.Error:
        return f"listening (pid {known[0]})"
    return f"{command_title(_safe(process.cmdline) or []) or _safe(process.name) or '?'} (pid {process.pid})"


def command_title(cmdline: list[str]) -> str:
    """The words before the first option: `nginx: master process nginx`. Options are left out because
    one could hold a secret that a log must not show."""
    words: list[str] = []
    for word in " ".join(cmdline).split():
        if word.startswith("-") or len(words) == 6:
            break
        words.append(word)
    title = " ".join(words)
    return title if len(title) <= 80 else title[:77] + "..."


def _safe(call):  # type: ignore[no-untyped-def]
    try:
        return call()
    except psutil.Error:
        return None
