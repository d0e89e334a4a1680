"""Shared test plumbing: where the repo, the fixtures and the public peer suite are, and how to run the agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "captures"
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "scripts"))


def run_agent(*args: str, check: bool = True, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """The agent as a user runs it: a separate process, its own exit code and stderr."""
    result = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"agent {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The agent failed as promised: a non-zero exit and one `agent: error:` line, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agent: error: ")
    return lines[0]


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(stderr: str) -> dict[str, int]:
    """The counters of the agent's closing summary line."""
    line = [line for line in stderr.splitlines() if line.startswith("summary: ")][-1]
    return {name: int(value) for name, value in (pair.split("=") for pair in line.split()[1:])}


@pytest.fixture
def agent():
    return run_agent
