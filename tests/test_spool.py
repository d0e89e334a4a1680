"""The durable spool: what was appended comes back after restarts, partial writes and damage; bounded."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from agent.sink.spool import ACK_FILE, Spool, SpoolBusy

BOUND = 1 << 20


def lines(first: int, count: int, pad: int = 0) -> list[bytes]:
    return [json.dumps({"id": f"e{i}", "pad": "x" * pad}, separators=(",", ":")).encode()
            for i in range(first, first + count)]


def joined(lines: list[bytes]) -> bytes:
    """Lines as JSON Lines, the way `append` takes them."""
    return b"".join(line + b"\n" for line in lines)


def drain(spool: Spool, batch_size: int = 64, ack: bool = True) -> list[bytes]:
    """Everything readable, in order (acknowledged as read unless `ack` is false)."""
    seen: list[bytes] = []
    for _ in range(100_000):
        batch = spool.read_batch(batch_size)
        if batch is None:
            return seen
        seen += batch.lines
        if ack:
            spool.ack(batch)
    raise AssertionError("spool never ran dry")


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.jsonl"))


def test_appended_lines_come_back_in_order_and_acknowledged_ones_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BOUND)
    assert spool.append(joined(lines(0, 500)), block=False) == 0  # none refused
    assert spool.pending_events == 500
    assert drain(spool) == lines(0, 500)
    assert spool.pending_events == 0
    spool.close()
    assert segment_files(tmp_path) == []
    assert spool.bytes_used == 0


def test_unacknowledged_lines_survive_a_restart_and_acknowledged_ones_do_not_return(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BOUND)
    spool.append(joined(lines(0, 300)), block=False)
    first = spool.read_batch(100)
    spool.ack(first)
    spool.read_batch(100)  # read, sent, never acknowledged: must come back
    spool.close()

    again = Spool(tmp_path, BOUND)
    assert again.recovered_events == 200
    assert drain(again) == lines(100, 200)
    again.close()


def test_a_partial_last_line_from_a_killed_write_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BOUND)
    spool.append(joined(lines(0, 10)), block=False)
    spool.close()
    # a kill during write() leaves the segment ending in the middle of an event
    (segment,) = segment_files(tmp_path)
    with open(segment, "ab") as damaged:
        damaged.write(b'{"id":"e10","pad":"trunc')
    spool = Spool(tmp_path, BOUND)
    assert spool.truncated_bytes == len(b'{"id":"e10","pad":"trunc')
    assert drain(spool) == lines(0, 10)
    spool.append(joined(lines(11, 1)), block=False)
    assert drain(spool) == lines(11, 1)
    spool.close()


def test_a_line_damaged_on_disk_is_reported_apart_and_does_not_hide_its_neighbours(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BOUND)
    spool.append(joined(lines(0, 2) + [b"\x00\x00\x00\x00"] + lines(2, 2)), block=False)
    batch = spool.read_batch(10)
    assert batch.lines == lines(0, 4)
    assert batch.unreadable == [b"\x00\x00\x00\x00"]
    spool.ack(batch)
    assert spool.pending_events == 0
    spool.close()


def test_an_unreadable_ack_file_means_resending_everything_not_losing_anything(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BOUND)
    spool.append(joined(lines(0, 50)), block=False)
    spool.ack(spool.read_batch(20))
    spool.close()
    (tmp_path / ACK_FILE).write_text("{not json")
    spool = Spool(tmp_path, BOUND)
    assert drain(spool) == lines(0, 50)  # 20 re-sent: the ingest side de-duplicates them by id
    spool.close()


def test_segments_rotate_are_read_across_in_order_and_are_deleted_once_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 64 * 1024)  # 4 KiB segments
    assert spool.append(joined(lines(0, 1000)), block=False) == 0  # about 24 KiB, none refused
    assert len(segment_files(tmp_path)) > 3
    read = drain(spool, batch_size=37)
    assert read == lines(0, 1000)
    assert len(segment_files(tmp_path)) == 1  # only the active segment is left
    spool.close()


def test_segment_numbers_keep_growing_across_restarts_so_an_old_ack_never_deletes_new_events(tmp_path: Path) -> None:
    for round_ in range(3):
        spool = Spool(tmp_path, BOUND)
        spool.append(joined(lines(round_ * 10, 10)), block=False)
        assert drain(spool) == lines(round_ * 10, 10)
        spool.close()
    spool = Spool(tmp_path, BOUND)
    spool.append(joined(lines(100, 5)), block=False)
    spool.close()
    spool = Spool(tmp_path, BOUND)
    assert drain(spool) == lines(100, 5)
    spool.close()


def test_without_blocking_a_full_spool_keeps_what_fits_and_says_how_many(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 16 * 1024)
    offered = lines(0, 1000, pad=20)
    refused = spool.append(joined(offered), block=False)
    assert 0 < refused < 1000
    kept = 1000 - refused
    assert spool.bytes_used <= 16 * 1024
    assert spool.is_full
    assert drain(spool, batch_size=1000) == offered[:kept]
    assert spool.append(joined(offered[kept:kept + 10]), block=False) == 0  # room again once acknowledged
    spool.close()


def test_blocking_waits_for_acknowledgements_and_keeps_everything(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 16 * 1024)
    offered = lines(0, 3000, pad=20)  # several times the bound
    read: list[bytes] = []
    done = threading.Event()

    def deliver() -> None:
        while not done.is_set() or spool.pending_events:
            if spool.wait_ready(50, 0.0, 0.2):
                batch = spool.read_batch(50)
                read.extend(batch.lines)
                spool.ack(batch)

    reader = threading.Thread(target=deliver)
    reader.start()
    assert spool.append(joined(offered), block=True) == 0
    done.set()
    reader.join(30)
    assert not reader.is_alive()
    assert read == offered
    spool.close()


def test_two_agents_cannot_share_a_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BOUND)
    with pytest.raises(SpoolBusy):
        Spool(tmp_path, BOUND)
    spool.close()
    Spool(tmp_path, BOUND).close()


def test_a_batch_is_due_when_full_or_when_its_oldest_event_waited_long_enough(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BOUND)
    assert not spool.wait_ready(10, 60.0, 0.01)
    spool.append(joined(lines(0, 3)), block=False)
    assert not spool.wait_ready(10, 60.0, 0.01)  # neither full nor old
    assert spool.wait_ready(10, 0.0, 0.01)  # old enough
    spool.append(joined(lines(3, 7)), block=False)
    assert spool.wait_ready(10, 60.0, 0.01)  # full
    spool.close()


def test_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, BOUND)
    spool.append(joined(lines(0, 1)), block=False)
    assert directory.stat().st_mode & 0o777 == 0o700
    assert all(path.stat().st_mode & 0o077 == 0 for path in segment_files(directory))
    spool.close()
