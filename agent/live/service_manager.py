"""systemd's side of a service: its notification socket (sd_notify(3)) and its file-descriptor store
(sd_listen_fds(3)). The agent tells it when capture has begun (`Type=notify`), and leaves its packet
sockets with it: the store keeps them open across a restart, so the kernel goes on filling their rings
while no agent runs, and the next start reads what was captured meanwhile (`ring_store.py`).

Both halves are plain environment and datagram protocols, written out here rather than taken from a
library: Debian's python3-systemd binds libsystemd (not installable from PyPI without its headers), and
the protocol is four fields.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import re
import socket

log = logging.getLogger("agent.live")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first descriptor passed


class ServiceManager:
    """The notification socket named by NOTIFY_SOCKET. A message that cannot be sent is logged once and
    dropped: the manager's view is a convenience, never a reason to stop capturing."""

    def __init__(self, address: str) -> None:
        # an address starting with "@" is in the abstract namespace
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._warned = False

    @classmethod
    def from_environment(cls) -> ServiceManager | None:
        """The manager this process runs under, if any; the variable is removed, so that the agent's own
        children (workers) do not take it for theirs."""
        address = os.environ.pop("NOTIFY_SOCKET", "")
        return cls(address) if address.startswith(("/", "@")) else None

    def notify(self, *fields: str, fds: tuple[int, ...] = ()) -> bool:
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as connection:
                # (socket.send_fds would do, but drops its address argument before Python 3.12)
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                connection.sendmsg([message], rights, 0, self.address)
        except OSError as error:
            if not self._warned:
                log.warning("cannot tell the service manager %r (%s)", fields[0], error.strerror or error)
                self._warned = True
            return False
        return True

    def ready(self) -> None:
        self.notify("READY=1")

    def store(self, name: str, fd: int) -> bool:
        """Leave `fd` with the manager under `name` (it keeps one copy per open file, however often sent)."""
        return self.notify("FDSTORE=1", f"FDNAME={name}", fds=(fd,))

    def remove(self, name: str) -> None:
        """Close what the manager keeps under `name`."""
        self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def inherited_fds() -> dict[str, list[int]]:
    """The descriptors the manager passed at this start, by name (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES);
    the variables are removed and the descriptors made close-on-exec, as sd_listen_fds does."""
    pid, count, names = (os.environ.pop(variable, "") for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if pid != str(os.getpid()) or not re.fullmatch(r"[0-9]{1,4}", count):
        return {}  # not ours, or not a count systemd would give (its store holds at most a few thousand)
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    passed: dict[str, list[int]] = {}
    for index, fd in enumerate(fds):
        try:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # announced but not open: nothing to take over
        passed.setdefault(labels[index] if index < len(labels) else "unknown", []).append(fd)
    return passed
