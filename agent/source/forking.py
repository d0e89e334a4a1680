"""Child processes of the live agent (capture workers, the CPU-share watcher): forked, never outliving
their parent, and leaving through `os._exit` so that nothing inherited (a sink's buffer, an open file)
is flushed or closed twice."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def fork(run: Callable[[], int], on_parent_death: int = signal.SIGTERM) -> int:
    """Start `run()` in a child process; returns its pid. The child gets `on_parent_death` if the parent dies."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, on_parent_death)
        except (OSError, AttributeError):
            pass  # not Linux's libc: the parent stops its children itself
        if os.getppid() == parent:  # else the parent died before the prctl took effect
            code = run()
    except BaseException as error:  # noqa: BLE001 - a child must never unwind into its parent's code
        log.error("child process failed: %s: %s", type(error).__name__, " ".join(str(error).split()))
    finally:
        os._exit(code)
