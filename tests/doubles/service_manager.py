"""A test double of systemd running a `Type=notify` service with `FileDescriptorStoreMax=` (systemd cannot
run here: it is not this container's init). It follows systemd's documented protocol:

- sd_notify(3): the service sends datagrams of `KEY=value` lines to the AF_UNIX socket named by
  NOTIFY_SOCKET. With `NotifyAccess=main` (the default for notify), a message from any process but the
  main one is ignored; the sender is known from its credentials (SO_PASSCRED).
- `FDSTORE=1` with `FDNAME=` and descriptors (SCM_RIGHTS) adds them to the store, unless the same open file
  is already there; `FDSTOREREMOVE=1` with `FDNAME=` closes and removes those of that name.
- sd_listen_fds(3): at the next start the stored descriptors are passed as 3, 4, ..., with LISTEN_FDS,
  LISTEN_FDNAMES (colon-separated) and LISTEN_PID set to the new main process's pid.
- The store is kept while the service restarts and closed when it is stopped for good (`close`).
"""

from __future__ import annotations

import array
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

MAX_FDS = 128  # FileDescriptorStoreMax= in the agent's unit (how many one message may carry, at most)


class ServiceManagerDouble:
    def __init__(self, directory: Path) -> None:
        self.address = str(directory / "notify")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind(self.address)
        self.store: list[tuple[str, int]] = []  # (name, descriptor), in the order stored
        self.messages: list[dict[str, str]] = []  # from the main process, in order
        self.ignored = 0  # messages from other processes
        self.main_pid = 0

    def command(self, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that start `argv` as the service's main process. A shell sets
        LISTEN_PID to its own pid and execs, so the agent has it; the stored descriptors are put at 3, 4..."""
        env = {**os.environ, "NOTIFY_SOCKET": self.address}
        if self.store:
            env["LISTEN_FDS"] = str(len(self.store))
            env["LISTEN_FDNAMES"] = ":".join(name for name, _ in self.store)
            argv = ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *argv]
        return argv, env

    def pass_fds(self) -> None:
        """In the child before exec: the stored descriptors at 3, 4, ... (through high numbers first, so
        that none is overwritten before it is moved)."""
        high = [os.dup2(fd, 1000 + index) for index, (_, fd) in enumerate(self.store)]
        for index, fd in enumerate(high):
            os.dup2(fd, 3 + index, inheritable=True)

    def start(self, argv: list[str], **popen: object) -> subprocess.Popen:
        command, env = self.command(argv)
        process = subprocess.Popen(command, env=env, preexec_fn=self.pass_fds,
                                   pass_fds=range(3, 3 + len(self.store)), **popen)  # type: ignore[call-overload]
        self.main_pid = process.pid
        return process

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Handle messages until one from the main process holds `key`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the service never sent {key}; it sent {self.messages}")
            message = self.receive(remaining)
            if message is not None and key in message:
                return message

    def receive(self, timeout: float) -> dict[str, str] | None:
        """One message's fields ({} if ignored), or None if none came within `timeout`."""
        self._socket.settimeout(timeout)
        fds = array.array("i")
        try:
            data, ancillary, _, _ = self._socket.recvmsg(4096, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
                                                         + socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        sender = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack("=iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        if sender != self.main_pid:
            self.ignored += 1
            for fd in fds:
                os.close(fd)
            return {}
        self.messages.append(fields)
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if any(os.path.samestat(os.fstat(fd), os.fstat(kept)) for _, kept in self.store):
                    os.close(fd)  # the same open file: systemd keeps one
                else:
                    self.store.append((fields.get("FDNAME", "stored"), fd))
        else:
            for fd in fds:
                os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            for name, fd in [entry for entry in self.store if entry[0] == fields.get("FDNAME")]:
                os.close(fd)
                self.store.remove((name, fd))
        return fields

    def drain(self) -> None:
        """Handle what the service sent before it exited."""
        while self.receive(0.05) is not None:
            pass

    def close(self) -> None:
        """The service is stopped for good: the store is closed."""
        for _, fd in self.store:
            os.close(fd)
        self.store = []
        self._socket.close()
