"""The answers a stop leaves beside a kept ring for the next run (`ring_store.leave_answers` and
`take_answers`): what one run writes the next reads back, once; anything else is said and ignored, never
a crash (a file that crashed every start would make a restart loop of the service)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.live.ring_store import leave_answers, take_answers

OWED = [(bytes([127, 0, 0, 1]), 40000, bytes([127, 0, 0, 1]), 8000, ["OTHER", "HEAD"], None, 0),
        (bytes(15) + b"\x01", 40001, bytes(15) + b"\x01", 8000, [], 0xFFFF_FFFF, 3)]


def ring_at(path: Path) -> SimpleNamespace:
    return SimpleNamespace(answers_path=path)


def test_what_a_stop_leaves_the_next_start_reads_back_once(tmp_path: Path) -> None:
    ring = ring_at(tmp_path / "agent-ring-1-of-1-x.answers.json")
    leave_answers(ring, OWED)
    assert take_answers(ring) == OWED
    assert not ring.answers_path.exists()
    assert take_answers(ring) == []


@pytest.mark.parametrize("text", [
    "not json", "null", '{"a": 1}', "Infinity", "[" * 100_000 + "]" * 100_000,
    '[["7f000001", 70000, "7f000001", 8000, [], null, 0]]',      # a port out of range
    '[["7f000001", -1, "7f000001", 8000, [], null, 0]]',
    '[["7f000001", true, "7f000001", 8000, [], null, 0]]',
    '[["7f000001", 1e30, "7f000001", 8000, [], null, 0]]',
    '[["7f0000", 1, "7f000001", 8000, [], null, 0]]',            # an address of 3 bytes
    '[["zz", 1, "7f000001", 8000, [], null, 0]]',
    '[["7f000001", 1, "7f000001", 8000, "OTHER", null, 0]]',  # a string is not a list of methods
    '[["7f000001", 1, "7f000001", 8000, ["GET"], null, 0]]',
    '[["7f000001", 1, "7f000001", 8000, [], null]]',   # no count of restarts
    '[["7f000001", 1, "7f000001", 8000, [], -1, 0]]',   # not a sequence number
    '[["7f000001", 1, "7f000001", 8000, [], 4294967296, 0]]',
    '[["7f000001", 1, "7f000001", 8000, [], null, 256]]',
    '[["7f000001", 1, "7f000001", 8000, [' + ", ".join(['"HEAD"'] * 1025) + '], null, 0]]',  # more than can wait
])
def test_a_file_that_is_not_what_a_stop_leaves_is_said_and_ignored(tmp_path: Path, text: str, caplog) -> None:
    ring = ring_at(tmp_path / "answers.json")
    ring.answers_path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="agent.live"):
        assert take_answers(ring) == []
    assert "which is not what a stop leaves" in caplog.text
    assert not ring.answers_path.exists()  # so the next start does not meet it again


def test_answers_that_cannot_be_left_are_said(tmp_path: Path, caplog) -> None:
    ring = ring_at(tmp_path / "missing-directory" / "answers.json")
    with caplog.at_level(logging.WARNING, logger="agent.live"):
        leave_answers(ring, OWED)
    assert "cannot leave the answers owed" in caplog.text
