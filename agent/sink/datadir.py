"""Where the agent keeps its state: the spool of undelivered events and the local event store.

The data directory is, in order:
- `--data-dir DIR` when given;
- `$AGENT_DATA_DIR` when set;
- `/var/lib/kong-metering-agent` when running as root (the agent runs privileged to capture, and
  /var/lib is where a system service keeps state that must survive reboots);
- otherwise `$XDG_DATA_HOME/kong-metering-agent`, falling back to `~/.local/share/kong-metering-agent`
  (an unprivileged user replaying capture files).

Inside it: `spool/` (the ingest spool) and `events.sqlite3` (the local store). The directory is
created with mode 0700 because events name consumers and the URIs they call.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_DIR_NAME = "kong-metering-agent"
DATA_DIR_ENV = "AGENT_DATA_DIR"
STORE_FILE_NAME = "events.sqlite3"
SPOOL_DIR_NAME = "spool"


def default_data_dir() -> Path:
    """The data directory when `--data-dir` is not given (see the module docstring)."""
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib") / APP_DIR_NAME
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / APP_DIR_NAME


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) with mode 0700; an existing directory is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def hand_over(directory: Path, uid: int, gid: int) -> None:
    """Give `directory` and everything in it to the `--user` the agent is about to switch to: the sink was
    opened as root, and must go on creating, renaming and writing files there after the switch."""
    if not directory.is_dir():
        return
    os.chown(directory, uid, gid)
    for root, names, files in os.walk(directory):
        for name in names + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
