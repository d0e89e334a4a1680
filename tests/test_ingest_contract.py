"""The ingest double answers what OpenMeter's published contract says, and the agent sends what it accepts.

The spec is read from ../shared/contracts (relative to the repository root), never copied, so the double
cannot drift from the real service unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from agent.sink.ingest import IngestSettings, IngestSink, api_token_source
from tests.doubles.ingest import V1_PATH, Fault, IngestDouble, json_lines, kong_events

SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "contracts" / "openmeter-ingest.openapi.yaml"
JSON_TYPES = ("application/cloudevents+json", "application/cloudevents-batch+json", "application/problem+json")
TOKEN = "contract-token"
BATCH = "application/cloudevents-batch+json"


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    assert SPEC.is_file(), f"the ingest contract should be at {SPEC}: the tests read it from ../shared"
    return OpenAPI.from_file_path(str(SPEC), config=Config(
        extra_media_type_deserializers={media_type: json.loads for media_type in JSON_TYPES}))


@pytest.fixture
def double() -> Iterator[IngestDouble]:
    with IngestDouble(TOKEN) as running:
        yield running


def event(**changes: object) -> dict:
    (base,) = kong_events(7, 1)
    base.update(changes)
    return {name: value for name, value in base.items() if value is not ...}


def as_request(double: IngestDouble, body: bytes, content_type: str) -> MockRequest:
    return MockRequest(double.base_url, "post", V1_PATH, data=body, content_type=content_type)


def as_response(response: httpx.Response) -> MockResponse:
    return MockResponse(response.content, status_code=response.status_code,
                        headers=dict(response.headers), content_type=response.headers.get("Content-Type", ""))


VALID = [
    ("a batch", [event(), event(id="other")], BATCH),
    ("one event", event(), "application/cloudevents+json"),
    ("one event as application/json", event(), "application/json"),
    ("a batch as application/json", [event()], "application/json"),
    ("optional time and data null", [event(time=None, data=None)], BATCH),
]

INVALID = [
    ("no subject", [event(subject=...)], BATCH),
    ("empty id", [event(id="")], BATCH),
    ("data not an object", [event(data=[1, 2])], BATCH),
    ("time not RFC 3339", [event(time="yesterday")], BATCH),
    ("datacontenttype not JSON", [event(datacontenttype="text/plain")], BATCH),
    ("an object where a batch is due", event(), BATCH),
    ("an unsupported content type", [event()], "text/plain"),
]


@pytest.mark.parametrize("case, document, content_type", VALID, ids=[case[0] for case in VALID])
def test_what_the_spec_accepts_the_double_acknowledges_with_204(
        spec: OpenAPI, double: IngestDouble, case: str, document: object, content_type: str) -> None:
    body = json.dumps(document).encode()
    spec.validate_request(as_request(double, body, content_type))
    response = httpx.post(double.url, content=body, headers={
        "Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 204
    spec.validate_response(as_request(double, body, content_type), as_response(response))
    sent = document if isinstance(document, list) else [document]
    assert double.accepted == [(e["source"], e["id"]) for e in sent]


@pytest.mark.parametrize("case, document, content_type", INVALID, ids=[case[0] for case in INVALID])
def test_what_the_spec_refuses_the_double_refuses_with_400_problem_json(
        spec: OpenAPI, double: IngestDouble, case: str, document: object, content_type: str) -> None:
    body = json.dumps(document).encode()
    with pytest.raises(Exception):
        spec.validate_request(as_request(double, body, content_type))
    response = httpx.post(double.url, content=body, headers={
        "Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    spec.validate_response(as_request(double, body, content_type), as_response(response))
    assert double.accepted == []


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}"])
def test_without_the_right_bearer_token_the_answer_is_401_problem_json(
        spec: OpenAPI, double: IngestDouble, authorization: str | None) -> None:
    body = json.dumps([event()]).encode()
    headers = {"Content-Type": BATCH} | ({"Authorization": authorization} if authorization else {})
    response = httpx.post(double.url, content=body, headers=headers)
    assert response.status_code == 401
    spec.validate_response(as_request(double, body, BATCH), as_response(response))
    assert double.accepted == []


@pytest.mark.parametrize("fault", [Fault("status", 503), Fault("status", 500), Fault("status", 429, retry_after="3")])
def test_injected_failures_are_answered_as_the_spec_says(spec: OpenAPI, double: IngestDouble, fault: Fault) -> None:
    double.inject(fault)
    body = json.dumps([event()]).encode()
    response = httpx.post(double.url, content=body, headers={"Content-Type": BATCH, "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == fault.status
    spec.validate_response(as_request(double, body, BATCH), as_response(response))
    if fault.retry_after:
        assert response.headers["Retry-After"] == fault.retry_after


def test_konnect_path_takes_the_same_events_and_answers_202(double: IngestDouble) -> None:
    body = json.dumps([event()]).encode()
    response = httpx.post(double.konnect_url, content=body, headers={
        "Content-Type": BATCH, "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 202 and response.content == b""


def test_every_request_the_agent_sends_is_valid_per_the_spec(
        spec: OpenAPI, double: IngestDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_API_TOKEN", TOKEN)
    sink = IngestSink(IngestSettings(double.url, tmp_path, batch_size=40, flush_interval=0.05), api_token_source())
    sink.write(json_lines(kong_events(0, 100)))
    sink.close()
    assert len(double.received) == 3
    for request in double.received:
        assert request.authorization == f"Bearer {TOKEN}"
        spec.validate_request(as_request(double, request.body, request.content_type))
