"""The delivery flags: which sink they pick, how they fail, and TLS verification on by default."""

from __future__ import annotations

import argparse
import logging
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sink.ingest import IngestSink
from agent.sink.jsonl import JsonLinesSink
from agent.sink.options import SinkConfigError, add_arguments, sink_from_args, spool_size
from tests.doubles.ingest import Fault, IngestDouble, json_lines, kong_events

TOKEN = "options-token"


@pytest.fixture(autouse=True)
def token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_API_TOKEN", TOKEN)


def parse(*argv: str) -> argparse.Namespace:
    """The flags as the CLI will have them: ours, plus the lead's --output and --read."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output")
    parser.add_argument("--read")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_output_picks_json_lines(tmp_path: Path) -> None:
    sink = sink_from_args(parse("--output", str(tmp_path / "events.jsonl")))
    assert isinstance(sink, JsonLinesSink)
    sink.close()


def test_replay_waits_for_acknowledgement_and_backpressures_live_capture_does_neither(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/api/v1/events"
    data_dir = tmp_path / "state"
    common = ("--ingest-endpoint", url, "--data-dir", str(data_dir))
    replay = sink_from_args(parse(*common, "--read", "capture.pcap"))
    assert (replay.settings.block_when_full, replay.settings.wait_for_ack) == (True, True)
    assert replay.settings.spool_dir == data_dir / "spool"
    assert [path.stat().st_mode & 0o777 for path in (data_dir, data_dir / "spool")] == [0o700, 0o700]
    replay.close(wait_for_ack=False)
    spooled = sink_from_args(parse(*common, "--read", "capture.pcap", "--exit-when-spooled"))
    assert (spooled.settings.block_when_full, spooled.settings.wait_for_ack) == (True, False)
    spooled.close()
    live = sink_from_args(parse(*common, "--spool-max-bytes", "64M", "--batch-size", "50"))
    assert (live.settings.block_when_full, live.settings.wait_for_ack) == (False, False)
    assert (live.settings.spool_max_bytes, live.settings.batch_size) == (64 << 20, 50)
    live.close()


@pytest.mark.parametrize("argv, message", [
    (("--output", "-", "--ingest-endpoint", "https://example.test/api/v1/events"), "alternatives"),
    (("--ingest-endpoint", "us.api.konghq.com/v3/openmeter/events"), r"http\(s\) URL"),
    (("--api-token-file", "token"), "needs --ingest-endpoint"),
])
def test_contradictory_or_malformed_flags_are_one_line_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(SinkConfigError, match=message):
        sink_from_args(parse(*argv))


def test_an_unreadable_token_file_is_a_clear_error_that_does_not_show_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("spat_secret\nsecond line\n")
    argv = ("--ingest-endpoint", "https://example.test/api/v1/events", "--data-dir", str(tmp_path))
    with pytest.raises(SinkConfigError) as malformed:
        sink_from_args(parse(*argv, "--api-token-file", str(token_file)))
    assert "spat_secret" not in str(malformed.value)
    with pytest.raises(SinkConfigError, match="cannot read"):
        sink_from_args(parse(*argv, "--api-token-file", str(tmp_path / "missing")))


def test_the_token_cannot_be_given_on_the_command_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("--api-token", TOKEN)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "METERING_API_TOKEN" in error and TOKEN not in error


@pytest.mark.parametrize("text, size", [("1073741824", 1 << 30), ("512M", 512 << 20), ("2G", 2 << 30),
                                        ("4GiB", 4 << 30), ("64kb", 64 << 10)])
def test_spool_sizes_take_binary_units(text: str, size: int) -> None:
    assert spool_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5", "1.5G", "100"])
def test_nonsense_spool_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        spool_size(text)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_double(certificate: tuple[Path, Path]) -> Iterator[IngestDouble]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with IngestDouble(TOKEN, tls=context) as running:
        yield running


def deliver(double: IngestDouble, tmp_path: Path, *flags: str) -> IngestSink:
    sink = sink_from_args(parse("--ingest-endpoint", double.url, "--data-dir", str(tmp_path), "--read", "x",
                                "--flush-interval", "0.01", "--ack-timeout", "1", *flags))
    sink.write(json_lines(kong_events(0, 20)))
    sink.close()
    return sink


def test_tls_is_verified_by_default(tls_double: IngestDouble, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    sink = deliver(tls_double, tmp_path)
    assert sink.counters()["pending"] == 20
    assert tls_double.accepted == []
    assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_a_ca_file_or_the_explicit_insecure_flag_lets_a_self_signed_endpoint_through(
        tls_double: IngestDouble, certificate: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = certificate
    assert deliver(tls_double, tmp_path / "ca", "--ingest-ca-file", str(cert)).counters()["pending"] == 0
    assert deliver(tls_double, tmp_path / "insecure", "--insecure-skip-tls-verify").counters()["pending"] == 0
    assert set(tls_double.accepted_counts()) == {(e["source"], e["id"]) for e in kong_events(0, 20)}


def test_exit_when_spooled_leaves_the_rest_for_the_next_start(tmp_path: Path) -> None:
    with IngestDouble(TOKEN) as double:
        double.inject(Fault("status", 503, times=None))
        argv = ("--ingest-endpoint", double.url, "--data-dir", str(tmp_path), "--read", "x")
        first = sink_from_args(parse(*argv, "--exit-when-spooled"))
        first.write(json_lines(kong_events(0, 20)))
        first.close()
        assert first.counters()["pending"] == 20
        double.clear_faults()
        second = sink_from_args(parse(*argv, "--flush-interval", "0"))
        second.close()
        assert second.counters()["pending"] == 0
        assert set(double.accepted_counts()) == {(e["source"], e["id"]) for e in kong_events(0, 20)}
