"""The control plane keeps the core in step: what the gateway says arrives after the flags were checked."""

from __future__ import annotations

import logging

from agent import _core
from agent.credentials.key_auth import KeyAuthConfig
from agent.metering.subject import SubjectRule
from agent.pipeline import Pipeline
from conftest import CAPTURES


def replay(pipeline: Pipeline) -> bytes:
    capture = _core.CaptureFile(str(CAPTURES / "crafted-pipelining.pcap"))
    lines, more = b"", True
    while more:
        batch, more = pipeline.feed_capture(capture, 4096)
        lines += batch
    return lines + pipeline.finish()


def header_pipeline(gateway: KeyAuthConfig | None) -> Pipeline:
    core = _core.Pipeline(ports=[8000], source="t", subject="header", subject_field="apikey")
    return Pipeline(core, SubjectRule("header", "apikey"), lambda: KeyAuthConfig(key_names=("x",)), lambda: None,
                    lambda: gateway)


def test_a_header_subject_that_is_one_of_the_gateways_key_names_stays_unresolved(caplog):
    """`--key-names x --subject header:apikey` against a gateway whose key-auth reads `apikey` (known only
    once the Admin API answers, in live mode): the subject would be the API key itself."""
    pipeline = header_pipeline(KeyAuthConfig(key_names=("apikey",)))
    with caplog.at_level(logging.ERROR):
        lines = replay(pipeline)
    assert lines == b""
    counts = pipeline.counters()
    assert counts["events"] == 0 and counts["unresolved"] == counts["requests"] - counts["rejected"] > 0
    assert "names one of key-auth's key names" in caplog.text


def test_the_same_subject_is_metered_when_the_gateway_reads_keys_elsewhere():
    pipeline = header_pipeline(KeyAuthConfig(key_names=("x",)))
    assert replay(pipeline).count(b"\n") == pipeline.counters()["events"] > 0
