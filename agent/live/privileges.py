"""`--user`: give up root once the packet sockets and rings are open.

An open packet socket keeps working without CAP_NET_RAW (the kernel checks the capability when the
socket is created, not when it is read), so nothing needs to be retained: supplementary groups, group
and user all change, and the process cannot get root back. (The CPU-share watcher can still raise the
capture's priority: `cpu_share.allow_return_after_privilege_drop` sets RLIMIT_NICE before the switch.)
What the agent reads afterwards, such as a decK file, must be readable by that user.
"""

from __future__ import annotations

import codecs
import logging
import os
import pwd

from agent.live.startup_checks import LiveCaptureError

log = logging.getLogger(__name__)


def user_entry(user: str) -> pwd.struct_passwd:
    """Checked before anything is opened, so a typo costs nothing."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise LiveCaptureError(f"--user {user}: no such user") from None


def drop_privileges(user: str) -> None:
    entry = user_entry(user)
    if os.geteuid() == entry.pw_uid:
        return
    # Python loads some modules only when first used; the new user may not be able to read the
    # interpreter's files (a Python installed under root's home), so load those while still root.
    codecs.lookup("idna")  # host names, for the ingest endpoint and the Admin API
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except PermissionError:
        raise LiveCaptureError(f"--user {user}: cannot switch user (only root can)") from None
    log.info("running as %s (uid %d, gid %d)", user, entry.pw_uid, entry.pw_gid)
