"""Damaged, odd or hostile capture files: each one is a one-line error or a counted skip, never a traceback,
a hang or a silent loss.

The files are made here from the recorded fixtures (cut, bit-flipped, or rewritten block by block with
struct), in pytest's tmp_path.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import dpkt
import pytest

from agent._core import CaptureError, CaptureFile
from conftest import CAPTURES, one_line_error, read_events, run_agent, summary

KONG = str(CAPTURES / "kong.yaml")
BASIC = CAPTURES / "nginx-basic.pcap"
BASIC_EVENTS = len(json.loads((CAPTURES / "nginx-basic.truth.json").read_text())["events"])

BLOCK_SHB, BLOCK_IDB, BLOCK_SPB, BLOCK_EPB = 0x0A0D0D0A, 1, 3, 6
LINKTYPE_ETHERNET, LINKTYPE_RAW = 1, 101
FIRST_UNREPRESENTABLE_SECOND = 253402300800  # 10000-01-01T00:00:00Z


DAMAGED = 3  # the exit status of a replay whose capture lost records


def replay(path: Path, status: int = 0, **run) -> dict[str, int]:
    result = run_agent("--read", str(path), "--credentials", KONG, "--output", "/dev/null", check=False, **run)
    assert "Traceback" not in result.stderr
    assert result.returncode == status, result.stderr
    return summary(result.stderr)


def basic_packets() -> list[tuple[float, bytes]]:
    with open(BASIC, "rb") as handle:
        return [(float(timestamp), bytes(frame)) for timestamp, frame in dpkt.pcap.Reader(handle)]


def read_all(path: Path) -> tuple[list[tuple[float, int, bytes]], int]:
    """Every frame CaptureFile yields and the records it counted as lost."""
    capture = CaptureFile(str(path))
    try:
        return list(capture), capture.truncated_records
    finally:
        capture.close()


# pcapng, little-endian, written block by block


def block(kind: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    return struct.pack("<II", kind, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def section_header() -> bytes:
    return block(BLOCK_SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))


def interface(linktype: int, options: bytes = b"") -> bytes:
    end_of_options = struct.pack("<HH", 0, 0) if options else b""
    return block(BLOCK_IDB, struct.pack("<HHI", linktype, 0, 0) + options + end_of_options)


def option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def packet(interface_id: int, ticks: int, frame: bytes) -> bytes:
    return block(BLOCK_EPB, struct.pack("<IIIII", interface_id, ticks >> 32, ticks & 0xFFFFFFFF, len(frame),
                                        len(frame)) + frame)


def simple_packet(frame: bytes) -> bytes:
    return block(BLOCK_SPB, struct.pack("<I", len(frame)) + frame)


def microseconds(timestamp: float) -> int:
    return round(timestamp * 1_000_000)


def basic_as_pcapng(path: Path, rewrite=None) -> Path:
    """nginx-basic.pcap as a one-interface pcapng; `rewrite(index, timestamp, frame)` may return other blocks."""
    blocks = [section_header(), interface(LINKTYPE_ETHERNET)]
    for index, (timestamp, frame) in enumerate(basic_packets()):
        replaced = rewrite(index, timestamp, frame) if rewrite else None
        blocks.append(packet(0, microseconds(timestamp), frame) if replaced is None else replaced)
    path.write_bytes(b"".join(blocks))
    return path


# 1. damaged gzip, and files that are not files


def test_a_gzip_cut_anywhere_is_one_line_or_a_counted_truncation_and_keeps_what_came_before(tmp_path):
    """`head -c N file.pcap.gz`: a small capture is damaged within the first megabyte it decompresses to."""
    whole = (CAPTURES / "nginx-basic-gz.pcap.gz").read_bytes()
    full, lost = read_all(CAPTURES / "nginx-basic-gz.pcap.gz")
    assert lost == 0 and len(full) == 204
    cut = tmp_path / "cut.pcap.gz"
    for length in [*range(1, 40), *range(40, len(whole), 97), len(whole) - 1]:
        cut.write_bytes(whole[:length])
        try:
            frames, lost = read_all(cut)
        except CaptureError as error:
            assert str(error).startswith(f"{cut}: ") and "\n" not in str(error)
            continue
        assert lost == 1, length
        assert frames == full[: len(frames)], length
    assert len(frames) >= 200  # what was read up to the cut is kept, not the megabyte around it


def test_a_gzip_with_flipped_bytes_is_one_line_or_counted(tmp_path):
    whole = (CAPTURES / "nginx-basic-gz.pcap.gz").read_bytes()
    damaged = tmp_path / "damaged.pcap.gz"
    for position in range(10, len(whole), 53):
        flipped = bytearray(whole)
        flipped[position] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        try:
            _, lost = read_all(damaged)
        except CaptureError as error:
            assert "\n" not in str(error)
            continue
        assert lost <= 1


def test_a_cut_gzip_on_the_command_line(tmp_path):
    short, longer = tmp_path / "short.pcap.gz", tmp_path / "longer.pcap.gz"
    whole = (CAPTURES / "nginx-basic-gz.pcap.gz").read_bytes()
    short.write_bytes(whole[:12])  # the gzip header and hardly any data: not even the capture header
    line = one_line_error(run_agent("--read", str(short), "--credentials", KONG, "--output", "/dev/null",
                                    check=False))
    assert line.startswith(f"agent: error: {short}: unreadable capture (")
    longer.write_bytes(whole[: len(whole) // 2])
    counters = replay(longer, DAMAGED)
    assert counters["corrupt_packets"] == 1 and 0 < counters["events"] < BASIC_EVENTS


def test_a_corrupt_gzip_on_the_command_line_keeps_what_came_before_the_damage(tmp_path):
    capture = CAPTURES / "crafted-interleaved.pcap"
    whole = replay(capture)
    damaged = tmp_path / "damaged.pcap.gz"
    flipped = bytearray(gzip.compress(capture.read_bytes()))
    flipped[len(flipped) // 2] ^= 0xFF
    damaged.write_bytes(bytes(flipped))
    counters = replay(damaged, DAMAGED)
    assert counters["corrupt_packets"] == 1
    assert whole["events"] // 3 < counters["events"] < whole["events"]


def test_concatenated_gzip_members_read_as_one_file(tmp_path):
    data = BASIC.read_bytes()
    packed = tmp_path / "two-members.pcap.gz"
    packed.write_bytes(gzip.compress(data[:5000]) + gzip.compress(data[5000:]))
    frames, lost = read_all(packed)
    assert lost == 0 and [frame for _, _, frame in frames] == [frame for _, frame in basic_packets()]


def test_a_gzip_bomb_is_read_a_megabyte_at_a_time(tmp_path):
    """A highly compressible capture must not be inflated in one piece."""
    header = BASIC.read_bytes()[:24]
    record = struct.pack("<IIII", 1, 0, 60, 60) + bytes(60)
    bomb = tmp_path / "bomb.pcap.gz"
    bomb.write_bytes(gzip.compress(header + record * 200_000, 9))
    capture = CaptureFile(str(bomb))
    try:
        sizes = [len(batch) for batch in capture.batches()]
    finally:
        capture.close()
    assert sum(sizes) == 200_000 and max(sizes) < 20_000


def test_a_fifo_is_refused_at_once_naming_it(tmp_path):
    fifo = tmp_path / "capture.pcap"
    os.mkfifo(fifo)
    line = one_line_error(run_agent("--read", str(fifo), "--credentials", KONG, "--output", "/dev/null",
                                    check=False, timeout=60))
    assert line == f"agent: error: {fifo}: not a regular file; --read takes a pcap or pcapng file (optionally .gz)"


def test_a_directory_is_refused_naming_it(tmp_path):
    line = one_line_error(run_agent("--read", str(tmp_path), "--credentials", KONG, check=False))
    assert line.startswith(f"agent: error: {tmp_path}: not a regular file")


# 2. captures the agent would otherwise drop whole


def test_a_pcap_of_a_link_type_the_agent_does_not_decode_is_refused(tmp_path):
    patched = bytearray(BASIC.read_bytes())
    patched[20:24] = struct.pack("<I", 999)
    unknown = tmp_path / "link-999.pcap"
    unknown.write_bytes(bytes(patched))
    line = one_line_error(run_agent("--read", str(unknown), "--credentials", KONG, "--output", "/dev/null",
                                    check=False))
    assert line == (f"agent: error: {unknown}: link type 999 is not one the agent decodes "
                    "(Ethernet, Linux SLL/SLL2, raw IP, BSD loopback)")


def test_a_pcapng_whose_interfaces_are_all_of_an_unknown_link_type_is_refused(tmp_path):
    capture = tmp_path / "usb.pcapng"
    capture.write_bytes(section_header() + interface(220) + packet(0, 1, b"\x00" * 64))
    assert "link type 220 is not one the agent decodes" in one_line_error(
        run_agent("--read", str(capture), "--credentials", KONG, check=False))


def test_packets_of_an_unknown_interface_link_type_are_counted_in_the_summary(tmp_path):
    """An unknown interface beside a known one: its packets are a loss, so the summary says how many."""
    packets = basic_packets()
    blocks = [section_header(), interface(LINKTYPE_ETHERNET), interface(220)]
    blocks += [packet(0, microseconds(timestamp), frame) for timestamp, frame in packets]
    blocks += [packet(1, microseconds(packets[-1][0]), b"\x00" * 40)] * 3
    capture = tmp_path / "mixed.pcapng"
    capture.write_bytes(b"".join(blocks))
    counters = replay(capture)
    assert counters["unsupported_link"] == 3
    assert counters["events"] == BASIC_EVENTS


def test_each_pcapng_interface_has_its_own_link_type(tmp_path):
    """IDB 0 Ethernet, IDB 1 raw IP: every other packet comes through the second interface, without its
    Ethernet header; the events must be those of the plain capture."""
    blocks = [section_header(), interface(LINKTYPE_ETHERNET), interface(LINKTYPE_RAW)]
    for index, (timestamp, frame) in enumerate(basic_packets()):
        blocks.append(packet(1, microseconds(timestamp), frame[14:]) if index % 2 else
                      packet(0, microseconds(timestamp), frame))
    capture = tmp_path / "two-interfaces.pcapng"
    capture.write_bytes(b"".join(blocks))
    frames, lost = read_all(capture)
    assert lost == 0 and {linktype for _, linktype, _ in frames} == {LINKTYPE_ETHERNET, LINKTYPE_RAW}
    plain, both = tmp_path / "plain.jsonl", tmp_path / "both.jsonl"
    run_agent("--read", str(BASIC), "--credentials", KONG, "--output", str(plain))
    counters = summary(run_agent("--read", str(capture), "--credentials", KONG, "--output", str(both)).stderr)
    assert read_events(both) == read_events(plain)
    assert counters["corrupt_packets"] == counters["unsupported_link"] == 0


def test_pcapng_timestamp_resolution_and_offset_of_each_interface(tmp_path):
    """Nanosecond ticks on one interface, a 1000-second offset on the other: the same times either way."""
    nanoseconds = option(9, b"\x09")
    offset = option(14, struct.pack("<q", 1000))
    blocks = [section_header(), interface(LINKTYPE_ETHERNET, nanoseconds), interface(LINKTYPE_ETHERNET, offset)]
    packets = basic_packets()
    for index, (timestamp, frame) in enumerate(packets):
        blocks.append(packet(0, microseconds(timestamp) * 1000, frame) if index % 2 else
                      packet(1, microseconds(timestamp - 1000), frame))
    capture = tmp_path / "resolutions.pcapng"
    capture.write_bytes(b"".join(blocks))
    frames, _ = read_all(capture)
    assert [round(timestamp, 6) for timestamp, _, _ in frames] == [round(timestamp, 6) for timestamp, _ in packets]


def test_simple_packet_blocks_have_no_timestamp_so_are_counted_and_skipped(tmp_path):
    capture = basic_as_pcapng(tmp_path / "spb.pcapng",
                              lambda index, _, frame: simple_packet(frame) if index in (100, 150) else None)
    frames, lost = read_all(capture)
    assert (len(frames), lost) == (202, 2)
    result = run_agent("--read", str(capture), "--credentials", KONG, "--output", "/dev/null", check=False)
    assert result.returncode == DAMAGED
    assert summary(result.stderr)["corrupt_packets"] == 2
    warnings = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert warnings == [f"agent: WARNING: {capture}: 2 records skipped: Simple Packet Blocks, which carry no timestamp"]


def test_a_packet_of_an_interface_never_described_is_counted(tmp_path):
    capture = basic_as_pcapng(tmp_path / "stray.pcapng",
                              lambda index, timestamp, frame: packet(5, microseconds(timestamp), frame)
                              if index == 7 else None)
    frames, lost = read_all(capture)
    assert (len(frames), lost) == (203, 1)


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_pcapng_cut_inside_a_block_counts_it(tmp_path, cut):
    whole = basic_as_pcapng(tmp_path / "whole.pcapng").read_bytes()
    last = struct.unpack_from("<I", whole, len(whole) - 4)[0]
    start = len(whole) - last  # where the last block begins
    capture = tmp_path / "cut.pcapng"
    capture.write_bytes(whole[: start + cut])
    frames, lost = read_all(capture)
    assert (len(frames), lost) == (203, 1)


def test_a_pcapng_block_with_an_impossible_length_stops_there_counted(tmp_path):
    whole = bytearray(basic_as_pcapng(tmp_path / "whole.pcapng").read_bytes())
    second_packet = len(section_header()) + len(interface(LINKTYPE_ETHERNET))
    second_packet += struct.unpack_from("<I", whole, second_packet + 4)[0]
    whole[second_packet + 4: second_packet + 8] = struct.pack("<I", 7)
    capture = tmp_path / "bad-length.pcapng"
    capture.write_bytes(bytes(whole))
    frames, lost = read_all(capture)
    assert (len(frames), lost) == (1, 1)


def test_a_big_endian_pcapng_section_after_a_little_endian_one(tmp_path):
    """A new section header may switch byte order and starts its own interface numbering."""
    packets = basic_packets()
    first = [section_header(), interface(LINKTYPE_ETHERNET)]
    first += [packet(0, microseconds(timestamp), frame) for timestamp, frame in packets[:100]]

    def big(kind: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        return struct.pack(">II", kind, len(body) + 12) + body + struct.pack(">I", len(body) + 12)

    second = [big(BLOCK_SHB, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1)),
              big(BLOCK_IDB, struct.pack(">HHI", LINKTYPE_RAW, 0, 0))]
    for timestamp, frame in packets[100:]:
        ticks = microseconds(timestamp)
        second.append(big(BLOCK_EPB, struct.pack(">IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame) - 14,
                                                 len(frame) - 14) + frame[14:]))
    capture = tmp_path / "two-sections.pcapng"
    capture.write_bytes(b"".join(first + second))
    frames, lost = read_all(capture)
    assert lost == 0
    assert [linktype for _, linktype, _ in frames] == [LINKTYPE_ETHERNET] * 100 + [LINKTYPE_RAW] * 104
    assert [frame for _, _, frame in frames[100:]] == [frame[14:] for _, frame in packets[100:]]


def test_a_recorded_pcapng_reads_as_the_same_recording_in_pcap():
    frames, lost = read_all(CAPTURES / "nginx-basic-ng.pcapng")
    assert lost == 0 and frames == [(timestamp, LINKTYPE_ETHERNET, frame) for timestamp, frame in basic_packets()]


# 3. timestamps no date can hold


@pytest.mark.parametrize("seconds", [FIRST_UNREPRESENTABLE_SECOND, 2 ** 63 // 10 ** 6])
def test_a_pcapng_timestamp_past_year_9999_is_a_counted_corrupt_packet(tmp_path, seconds):
    capture = basic_as_pcapng(tmp_path / "far-future.pcapng",
                              lambda index, _, frame: packet(0, seconds * 10 ** 6, frame) if index == 3 else None)
    frames, lost = read_all(capture)
    assert (len(frames), lost) == (203, 1)
    assert replay(capture, DAMAGED)["corrupt_packets"] == 1


def test_a_pcapng_timestamp_before_1970_is_a_counted_corrupt_packet(tmp_path):
    """A negative if_tsoffset takes every packet of that interface before the epoch."""
    blocks = [section_header(), interface(LINKTYPE_ETHERNET, option(14, struct.pack("<q", -(10 ** 12))))]
    blocks += [packet(0, microseconds(timestamp), frame) for timestamp, frame in basic_packets()]
    capture = tmp_path / "before-epoch.pcapng"
    capture.write_bytes(b"".join(blocks))
    counters = replay(capture, DAMAGED)
    assert counters["corrupt_packets"] == 204 and counters["packets"] == 0


def test_the_last_representable_second_is_still_a_packet(tmp_path):
    capture = basic_as_pcapng(tmp_path / "last-second.pcapng",
                              lambda index, _, frame: packet(0, (FIRST_UNREPRESENTABLE_SECOND - 1) * 10 ** 6, frame)
                              if index == 0 else None)
    frames, lost = read_all(capture)
    assert (len(frames), lost) == (204, 0)



# 4. packets cut short when captured (a small snap length), and frames that cannot be decoded


def basic_as_pcap(path: Path, snap_length: int = 262144, rewrite=None) -> Path:
    """nginx-basic.pcap rewritten record by record: `rewrite(index, frame)` gives (the bytes kept, the length
    on the wire); by default each frame is cut at `snap_length`, as `tcpdump -s` writes it."""
    header = bytearray(BASIC.read_bytes()[:24])
    header[16:20] = struct.pack("<I", snap_length)
    records = [bytes(header)]
    for index, (timestamp, frame) in enumerate(basic_packets()):
        kept, wire = rewrite(index, frame) if rewrite else (frame[:snap_length], len(frame))
        ticks = microseconds(timestamp)
        records.append(struct.pack("<IIII", ticks // 1_000_000, ticks % 1_000_000, len(kept), wire) + kept)
    path.write_bytes(b"".join(records))
    return path


def payload_length(frame: bytes) -> int:
    return len(dpkt.ethernet.Ethernet(frame).data.data.data)


def damage_run(path: Path, *extra: str) -> tuple[int, dict[str, int], list[str]]:
    """The exit status, the summary's counters and the warning lines of a replay of `path`."""
    result = run_agent("--read", str(path), "--credentials", KONG, "--output", "/dev/null", *extra, check=False)
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("agent: WARNING: ")]
    return result.returncode, summary(result.stderr), warnings


def doctor_line(path: Path) -> str:
    result = run_agent("doctor", "--read", str(path), "--credentials", KONG, "--output", "/dev/null", check=False)
    return next(line for line in result.stdout.splitlines() if "capture file:" in line)


def test_a_capture_cut_by_a_small_snap_length_says_so_counts_the_packets_and_exits_3(tmp_path):
    """`tcpdump -s 60`: every packet with a payload lost its bytes; the ACKs, cut in their TCP options only,
    are still read. The loss is named in one line with its cause and its count, not left to corrupt_packets."""
    capture = basic_as_pcap(tmp_path / "snap60.pcap", 60)
    carrying = sum(payload_length(frame) > 0 for _, frame in basic_packets())
    assert 0 < carrying < len(basic_packets())
    status, counters, warnings = damage_run(capture)
    assert status == DAMAGED
    assert counters["cut_short_packets"] == carrying
    assert counters["corrupt_packets"] == counters["events"] == 0
    assert counters["connections"] > 0  # the handshakes, cut in their options, were read
    assert warnings == [f"agent: WARNING: {capture}: {carrying} packets were cut short by the capture's snap length"
                        " (60 bytes): their bytes are lost; capture whole frames (tcpdump -s 0)"]
    status, in_workers, _ = damage_run(capture, "--workers", "2")
    assert (status, in_workers) == (DAMAGED, counters)
    assert doctor_line(capture).startswith("warn  capture file: readable, but its snap length is 60 bytes: ")
    assert doctor_line(BASIC) == "ok    capture file: readable"


def test_a_pcapng_whose_interface_has_a_small_snap_length_is_the_same(tmp_path):
    blocks = [section_header(), block(BLOCK_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 96))]
    for timestamp, frame in basic_packets():
        ticks = microseconds(timestamp)
        kept = frame[:96]
        blocks.append(block(BLOCK_EPB, struct.pack("<IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(kept),
                                                   len(frame)) + kept))
    capture = tmp_path / "snap96.pcapng"
    capture.write_bytes(b"".join(blocks))
    lost = sum(66 + payload_length(frame) > 96 for _, frame in basic_packets())
    status, counters, warnings = damage_run(capture)
    assert (status, counters["cut_short_packets"], counters["corrupt_packets"]) == (DAMAGED, lost, 0)
    assert warnings == [f"agent: WARNING: {capture}: {lost} packets were cut short by the capture's snap length"
                        " (96 bytes): their bytes are lost; capture whole frames (tcpdump -s 0)"]
    assert doctor_line(capture).startswith("warn  capture file: readable, but its snap length is 96 bytes: ")


def test_a_frame_cut_short_that_still_holds_its_whole_packet_is_used(tmp_path):
    """Records shorter than the frame on the wire by a trailer the capture did not keep (an FCS), or pure
    ACKs cut in their TCP options: nothing they carry is lost, so every event is there and the exit is 0."""
    trailer = basic_as_pcap(tmp_path / "no-fcs.pcap", rewrite=lambda _, frame: (frame, len(frame) + 4))
    acks = basic_as_pcap(tmp_path / "acks-cut.pcap", rewrite=lambda _, frame: (
        (frame[:60], len(frame)) if payload_length(frame) == 0 else (frame, len(frame))))
    for capture in (trailer, acks):
        status, counters, warnings = damage_run(capture)
        assert (status, counters["events"], counters["cut_short_packets"], counters["corrupt_packets"], warnings) == (
            0, BASIC_EVENTS, 0, 0, []), capture.name


def test_empty_records_and_frames_shorter_than_their_ip_length_are_named_and_exit_3(tmp_path):
    """incl_len 0 (with the wire length: cut short; without: nothing there), and a frame recorded whole whose
    IP length says more than it holds (corrupt): counted apart, each cause in one warning line."""
    carrying = [index for index, (_, frame) in enumerate(basic_packets()) if payload_length(frame) > 0]

    def rewrite(index: int, frame: bytes) -> tuple[bytes, int]:
        if index == carrying[0]:
            return b"", len(frame)
        if index == carrying[1]:
            return b"", 0
        if index in carrying[2:4]:
            return frame[:-5], len(frame) - 5
        return frame, len(frame)

    capture = basic_as_pcap(tmp_path / "damaged-frames.pcap", rewrite=rewrite)
    status, counters, warnings = damage_run(capture)
    assert status == DAMAGED
    assert (counters["cut_short_packets"], counters["corrupt_packets"]) == (1, 3)
    assert 0 < counters["events"] < BASIC_EVENTS
    assert warnings == [
        f"agent: WARNING: {capture}: 1 packet was cut short when captured (the file holds less of each than was"
        " on the wire): their bytes are lost; capture whole frames (tcpdump -s 0)",
        f"agent: WARNING: {capture}: 3 packets could not be decoded (link, IP or TCP headers cut or inconsistent)"
        " and were skipped: what they carried is lost"]
