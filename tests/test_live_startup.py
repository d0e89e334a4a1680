"""Start-up checks of live capture: each problem is one line on stderr and a non-zero exit, before
anything is captured. Runs as any user (as root, the capability to capture is taken away first)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CAPTURES, REPO

PR_CAPBSET_DROP, CAP_NET_RAW = 24, 13


def without_cap_net_raw() -> None:
    """Like a container without NET_RAW: root, but the capability is gone from the bounding set."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_NET_RAW) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def live_agent(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "agent", "--port", "8000", "--credentials", str(CAPTURES / "kong.yaml"),
               "--output", str(tmp_path / "events.jsonl"), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                          preexec_fn=without_cap_net_raw)


def test_unknown_interface_is_one_line_listing_the_real_ones(tmp_path: Path) -> None:
    result = live_agent(tmp_path, "--iface", "nosuch0")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agent: error: no interface 'nosuch0'; this host has: ")
    assert "lo" in lines[0].split("has: ", 1)[1].split(", ")


def test_no_permission_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    result = live_agent(tmp_path, "--iface", "lo")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "agent: error: no permission to capture on lo: run as root or grant CAP_NET_RAW "
        "(setcap cap_net_raw+ep on the Python interpreter)"]


@pytest.mark.parametrize("args, message", [
    (["--user", "no-such-user-x"], "agent: error: --user no-such-user-x: no such user"),
    (["--ring-mb", str(1 << 20)], "agent: error: 1 x 1048576 MiB of ring is more than half the memory available"),
    (["--workers", "0"], "agent: error: argument --workers: must be between 1 and 64"),
], ids=["unknown user", "ring larger than memory", "no workers"])
def test_bad_flags_are_one_line_before_anything_is_opened(tmp_path: Path, args: list[str], message: str) -> None:
    result = live_agent(tmp_path, "--iface", "lo", *args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("agent: ")]  # argparse adds usage
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr

