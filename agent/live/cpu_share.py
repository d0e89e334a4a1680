"""Yield the CPU to the gateway while the ring has room; take priority before the ring could overflow.

Metering a request costs the agent about as much CPU as serving it costs the gateway and its clients
(~28 us against ~33 us measured here), so at the gateway's peak an agent competing as an equal takes
much of its throughput. The ring is the buffer that makes waiting safe: the capture threads run at idle
priority (SCHED_IDLE: any other task that wakes preempts them) and catch up when the gateway quietens.

An idle-priority thread may not run at all while the gateway is busy, so it cannot be the one to notice
that its ring is filling. A small watcher process at normal priority looks at every ring twenty times a
second: once a ring is three quarters full, the gateway's load is more than a burst, and losing packets
would lose billing data, so the capture thread takes priority over the gateway (nice -10) until its
ring is down to a quarter; then it yields again. An equal share was measured not to be enough: among the
gateway's processes the capture gets too small a part, and the ring kept filling. The watcher has no
GIL to share with the threads it watches, so a starved capture thread cannot block it.

A stop is the watcher's too: an idle thread may wait seconds for the CPU to take a stop signal, and then
finish its batch at idle priority, while the agent's supervisor counts down to SIGKILL (20 s in
`deploy/`) with a backlog that would then be lost. So the watcher looks for a stop signal pending in the
processes it watches: once one is, every capture thread takes priority and the watcher ends. A signal
already taken raises its thread by itself (`StopFlag`, with `catch_up_priority` as its first action).

Leaving SCHED_IDLE and going below nice 0 need CAP_SYS_NICE or an RLIMIT_NICE of 30;
`allow_return_after_privilege_drop()` raises that limit while the process is still root, so it also
works after `--user`. Where neither is to be had (root without CAP_SYS_RESOURCE before `--user`, a user
with CAP_NET_RAW alone), `can_take_priority_back()` says so and the capture does not yield at all.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time

from agent.source.packet_ring import PacketRing
from agent.workers import fork

log = logging.getLogger(__name__)

BUSY_FRACTION = 0.75   # ring this full: take priority over the gateway
CALM_FRACTION = 0.25   # ring this empty again: yield again
CATCH_UP_NICE = -10
WATCH_SECONDS = 0.05
STOP_SIGNAL_MASK = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))  # as /proc's SigPnd shows them


def allow_return_after_privilege_drop() -> None:
    """RLIMIT_NICE 30 lets an unprivileged process leave SCHED_IDLE for nice -10 (20 - limit)."""
    try:
        resource.setrlimit(resource.RLIMIT_NICE, (20 - CATCH_UP_NICE, 20 - CATCH_UP_NICE))
    except (OSError, ValueError):
        pass  # not root: whatever the limit is stays


def can_take_priority_back() -> bool:
    """Whether this process, as it now is (user, capabilities, RLIMIT_NICE), could leave idle priority for
    the catch-up priority. Yielding without that would risk a starved capture and a full ring, so it is
    tried first, in a child process, leaving this one as it was."""
    pid = fork(_try_priorities, on_parent_death=signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _try_priorities() -> int:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, CATCH_UP_NICE)
    except OSError:
        return 1
    return 0


def start_watcher(targets: list[tuple[int, PacketRing]], followers: tuple[int, ...] = ()) -> int:
    """Fork the watcher for (capture thread id, its ring) pairs; it puts them at idle priority at once.
    `followers` (the thread that takes the workers' events) yield while every capture thread does.
    Returns its pid; stop it with `stop_watcher` before the capture threads drain at a stop."""
    return fork(lambda: _watch(targets, followers), on_parent_death=signal.SIGKILL)


def stop_watcher(pid: int) -> None:
    """At a stop, before the capture threads take `catch_up_priority()`."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def catch_up_priority() -> None:
    """The calling thread takes priority over the gateway: at a stop, the ring must be read before the deadline."""
    _set_policy(0, os.SCHED_OTHER)


def _watch(targets: list[tuple[int, PacketRing]], followers: tuple[int, ...]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):  # a stop ends the watcher at once, not after the capture
        signal.signal(signum, signal.SIG_DFL)
    for _, ring in targets:
        ring.close_socket()  # the map is all the watcher needs; the socket stays the capture's alone
    # nor any other descriptor of the agent's (the maps stay): the TLS probes' perf events among them, which
    # must close when the agent closes them (an exited gateway process's, and its trace events at a stop)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    yielding = {tid: _set_policy(tid, os.SCHED_IDLE) for tid, _ in targets}
    if not any(yielding.values()):
        return 0
    followers_yield = all(_set_policy(tid, os.SCHED_IDLE) for tid in followers)
    while True:
        time.sleep(WATCH_SECONDS)
        if any(_stop_pending(tid) for tid in (*yielding, *followers)):
            for tid in (*yielding, *followers):
                _set_policy(tid, os.SCHED_OTHER)
            return 0
        if followers_yield != all(yielding.values()):
            followers_yield = not followers_yield
            for tid in followers:
                _set_policy(tid, os.SCHED_IDLE if followers_yield else os.SCHED_OTHER)
        for tid, ring in targets:
            backlog = ring.ready_fraction()
            if yielding[tid] and backlog >= BUSY_FRACTION:
                if not _set_policy(tid, os.SCHED_OTHER):
                    return 1
                yielding[tid] = False
                log.info("the ring of capture %d is %.0f%% full: it takes priority over the gateway until it "
                         "has caught up", tid, backlog * 100)
            elif not yielding[tid] and backlog <= CALM_FRACTION:
                yielding[tid] = _set_policy(tid, os.SCHED_IDLE)


def _stop_pending(tid: int) -> bool:
    """Whether SIGINT or SIGTERM waits to be taken by thread `tid` or its process (/proc's pending sets)."""
    try:
        with open(f"/proc/{tid}/status") as file:
            status = file.read()
    except OSError:  # ended
        return False
    return any(int(line.split()[1], 16) & STOP_SIGNAL_MASK for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:")))


def _set_policy(tid: int, policy: int) -> bool:
    """SCHED_IDLE, or SCHED_OTHER at the catch-up nice value."""
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(0))
        if policy == os.SCHED_OTHER:
            os.setpriority(os.PRIO_PROCESS, tid, CATCH_UP_NICE)  # a thread id: this thread only
    except ProcessLookupError:
        return False
    except OSError as error:
        log.warning("cannot change the CPU priority of capture %d (%s)", tid, error.strerror or error)
        return False
    return True
