"""The answers a stop leaves beside a kept ring for the next run (`ring_store.leave_answers` and
`take_answers`, in a memory file the service manager keeps): what one run writes the next reads back, once;
anything else is said and ignored, never a crash (a file that crashed every start would make a restart loop
of the service)."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest

from agent.live.ring_store import MAX_ANSWERS_BYTES, _move_earlier_answers, leave_answers, take_answers

OWED = [(bytes([127, 0, 0, 1]), 40000, bytes([127, 0, 0, 1]), 8000, ["OTHER", "HEAD"], None, 0),
        (bytes(15) + b"\x01", 40001, bytes(15) + b"\x01", 8000, [], (0xFFFF_FFFF, "chunk-end"), 3)]


@pytest.fixture
def ring():
    answers = os.memfd_create("agent-ring-1-of-1-x-answers", os.MFD_CLOEXEC)
    yield SimpleNamespace(answers_fd=answers)
    os.close(answers)


def test_what_a_stop_leaves_the_next_start_reads_back_once(ring) -> None:
    leave_answers(ring, OWED[:1])
    leave_answers(ring, OWED)  # a later stop's answers replace an earlier one's
    assert take_answers(ring) == OWED
    assert os.fstat(ring.answers_fd).st_size == 0
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
    '[["7f000001", 1, "7f000001", 8000, [], 4294967296, 0]]',   # an earlier version's, out of range
    '[["7f000001", 1, "7f000001", 8000, [], true, 0]]',
    '[["7f000001", 1, "7f000001", 8000, [], [-1, "message"], 0]]',   # not a sequence number
    '[["7f000001", 1, "7f000001", 8000, [], [4294967296, "message"], 0]]',
    '[["7f000001", 1, "7f000001", 8000, [], [7, "body"], 0]]',   # nothing a client is picked up in
    '[["7f000001", 1, "7f000001", 8000, [], [7, ["message"]], 0]]',
    '[["7f000001", 1, "7f000001", 8000, [], [7], 0]]',
    '[["7f000001", 1, "7f000001", 8000, [], null, 256]]',
    '[["7f000001", 1, "7f000001", 8000, [' + ", ".join(['"HEAD"'] * 1025) + '], null, 0]]',  # more than can wait
])
def test_a_file_that_is_not_what_a_stop_leaves_is_said_and_ignored(ring, text: str, caplog) -> None:
    os.write(ring.answers_fd, text.encode())
    with caplog.at_level(logging.WARNING, logger="agent.live"):
        assert take_answers(ring) == []
    assert "which are not what a stop leaves" in caplog.text
    assert os.fstat(ring.answers_fd).st_size == 0  # so the next start does not meet it again


def test_an_earlier_versions_sequence_number_alone_is_where_a_message_begins(ring) -> None:
    """Versions before chunked uploads were handed over picked a client up in step at a message only."""
    os.write(ring.answers_fd, b'[["7f000001", 1, "7f000001", 8000, ["HEAD"], 7, 0]]')
    assert take_answers(ring) == [(bytes([127, 0, 0, 1]), 1, bytes([127, 0, 0, 1]), 8000, ["HEAD"], (7, "message"), 0)]


def test_a_file_larger_than_any_stop_leaves_is_read_no_further(ring, caplog) -> None:
    os.ftruncate(ring.answers_fd, MAX_ANSWERS_BYTES + (1 << 20))
    with caplog.at_level(logging.WARNING, logger="agent.live"):
        assert take_answers(ring) == []
    assert "(ValueError)" in caplog.text and os.fstat(ring.answers_fd).st_size == 0


def test_answers_that_cannot_be_left_are_said(caplog) -> None:
    read_only = os.open("/dev/null", os.O_RDONLY)
    try:
        with caplog.at_level(logging.WARNING, logger="agent.live"):
            leave_answers(SimpleNamespace(answers_fd=read_only), OWED)
    finally:
        os.close(read_only)
    assert "cannot leave the answers owed" in caplog.text


EARLIER = '[["7f000001", 1, "7f000001", 8000, [], 7, 0]]'  # what a version that kept them on disk left


def test_an_earlier_versions_answers_file_is_moved_into_the_memory_file_and_removed(ring, tmp_path) -> None:
    path = tmp_path / "agent-ring-1-of-1-x.answers.json"
    path.write_text(EARLIER)
    _move_earlier_answers(path, ring.answers_fd)
    assert not path.exists()
    assert take_answers(ring) == [(bytes([127, 0, 0, 1]), 1, bytes([127, 0, 0, 1]), 8000, [], (7, "message"), 0)]


def test_an_earlier_versions_answers_beside_a_ring_not_taken_over_are_only_removed(tmp_path) -> None:
    path = tmp_path / "agent-ring-1-of-1-x.answers.json"
    path.write_text(EARLIER)
    _move_earlier_answers(path, None)
    assert not path.exists()


@pytest.mark.parametrize("planted", ["a link to a root-only file", "a hard link to one", "a FIFO", "a directory"])
def test_what_is_not_an_earlier_versions_answers_file_is_not_read(ring, tmp_path, planted: str, caplog) -> None:
    """The data directory belongs to `--user`'s account, and the start runs as root: a link is not followed
    nor a hard link read (the target would reach the unprivileged run), a FIFO does not block the start."""
    path = tmp_path / "agent-ring-1-of-1-x.answers.json"
    secret = tmp_path / "secret"
    secret.write_text(EARLIER)
    secret.chmod(0o600)
    if planted == "a link to a root-only file":
        path.symlink_to(secret)
    elif planted == "a hard link to one":
        os.link(secret, path)
    elif planted == "a FIFO":
        os.mkfifo(path)
    else:
        path.mkdir()
    with caplog.at_level(logging.WARNING, logger="agent.live"):
        _move_earlier_answers(path, ring.answers_fd)
    assert os.fstat(ring.answers_fd).st_size == 0
    assert "ignoring the answers an earlier version left" in caplog.text
    assert path.is_dir() or not os.path.lexists(path)
