"""The CPU-share watcher with a real ring and a real process: idle priority while the ring has room,
priority over others once it is three quarters full, idle again once it is read. Needs root."""

from __future__ import annotations

import os
import pwd
import resource
import subprocess
import sys
import time

import pytest

from agent.live.cpu_share import CATCH_UP_NICE, can_take_priority_back, start_watcher, stop_watcher
from agent.source.packet_ring import BLOCK_BYTES
from test_live_ring import Server, open_ring, read_until_quiet

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packet sockets")]


def wait_for_policy(pid: int, policy: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.sched_getscheduler(pid) == policy:
            return True
        time.sleep(0.02)
    return False


def test_the_capture_yields_until_its_ring_fills_and_again_once_it_is_read() -> None:
    server = Server()
    ring = open_ring(server.port, ring_bytes=8 * BLOCK_BYTES)
    capture = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for the capture
    follower = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watcher = start_watcher([(capture.pid, ring)], followers=(follower.pid,))
    try:
        assert wait_for_policy(capture.pid, os.SCHED_IDLE)
        assert wait_for_policy(follower.pid, os.SCHED_IDLE)

        server.send(os.urandom(16 << 20))  # more than the ring holds, and nobody reading it
        assert wait_for_policy(capture.pid, os.SCHED_OTHER)
        assert os.getpriority(os.PRIO_PROCESS, capture.pid) == CATCH_UP_NICE
        assert wait_for_policy(follower.pid, os.SCHED_OTHER)

        read_until_quiet(ring)
        assert ring.ready_fraction() == 0
        assert wait_for_policy(capture.pid, os.SCHED_IDLE)
        assert wait_for_policy(follower.pid, os.SCHED_IDLE)
    finally:
        stop_watcher(watcher)
        for process in (capture, follower):
            process.kill()
            process.wait()
        ring.close()
        server.close()


def test_a_process_that_could_not_take_priority_back_is_told_so_before_it_yields() -> None:
    assert can_take_priority_back()  # root, with CAP_SYS_NICE
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # a user with CAP_NET_RAW at most and the default RLIMIT_NICE of 0: once idle, idle for good
        resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
        os.setgroups([])
        os.setgid(pwd.getpwnam("nobody").pw_gid)
        os.setuid(pwd.getpwnam("nobody").pw_uid)
        os.write(writer, b"yes" if can_take_priority_back() else b"no")
        os._exit(0)
    os.close(writer)
    answer = os.read(reader, 8)
    os.waitpid(child, 0)
    assert answer == b"no"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # trying it changed nothing here
