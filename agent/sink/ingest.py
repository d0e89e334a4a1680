"""Ingest sink: deliver events to an OpenMeter / Konnect ingest endpoint without losing one.

Kong's plugin keeps its queue in memory and drops events after 60 s of retries or on restart. Here:
- `write()` (the pipeline thread) puts the events' JSON Lines in the durable spool as they are (see
  `agent.sink.spool`) and returns; a background thread sends batches and removes them from the spool once
  acknowledged, so live capture never waits on the network. That thread also makes the endpoint's own checks
  (`agent.sink.validate`) on each event before its first send: one that fails is dead-lettered, never sent.
- A batch is up to `batch_size` events (default 500) or whatever waited `flush_interval` seconds
  (default 1.0), sent as `application/cloudevents-batch+json`. Any 2xx is an acknowledgement
  (OpenMeter's `/api/v1/events` answers 204, Konnect's `/v3/openmeter/events` 202).
- Connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and jitter (or after
  the server's `Retry-After` when it asks for a positive wait) for as long as it takes: the spool holds the events meanwhile.
- 401/403 (and any other 4xx or redirect, which a retry cannot fix either): one clear error line, the
  events stay, and the batch is retried every `auth_retry_interval` seconds, re-reading the token.
- 400/413: the batch is split in halves until the refused event is alone; it goes to the dead-letter file
  with the server's reason, and the rest are delivered.
Event ids are deterministic, so a batch re-sent after a lost acknowledgement is de-duplicated by the
ingest side on (source, id): at least once here, exactly once there.

A replay (`wait_for_ack`, `block_when_full`) waits for the endpoint as long as it acknowledges events;
with `give_up_after`, once that many seconds of waiting pass without one acknowledgement, it gives up:
`close()` returns with the rest spooled, and a `write()` waiting for room raises `DeliveryStalled`.

When the spool is full, `block_when_full` (replay) makes `write()` wait for room; otherwise (live
capture, which cannot wait without the kernel dropping packets) new events are refused, counted in
`dropped_full` and logged at ERROR (first drop, then every 10 s with the running count). Events already
in the spool are never discarded.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from agent.backoff import Backoff
from agent.sink import split_lines
from agent.sink.deadletter import DeadLetterFile
from agent.sink.retry import parse_retry_after
from agent.sink.spool import Batch, Spool
from agent.sink.validate import parse_line
from agent.tokens import Fallback, TokenError, TokenSource

log = logging.getLogger("agent.sink.ingest")

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
API_TOKEN_ENV = "METERING_API_TOKEN"
DEFAULT_BATCH_SIZE = 500
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_SPOOL_MAX_BYTES = 1 << 30
DEFAULT_AUTH_RETRY_INTERVAL = 30.0
DEAD_LETTER_FILE = "dead-letter.jsonl"
REPEAT_LOG_SECONDS = 30.0
DROP_LOG_SECONDS = 10.0
WAIT_LOG_SECONDS = 10.0
STOP_JOIN_SECONDS = 5.0
UNEXPECTED_RETRY_SECONDS = 5.0
UNEXPECTED_LOG_SECONDS = 60.0
READY_POLL_SECONDS = 0.5



def api_token_source(path: Path | None = None, fallback: Fallback | None = None) -> TokenSource:
    """`--api-token-file`, else `$METERING_API_TOKEN`, else `fallback` (the plugin's api_token)."""
    return TokenSource(path, API_TOKEN_ENV, "API token", fallback=fallback)

@dataclass(frozen=True)
class IngestSettings:
    endpoint: str
    spool_dir: Path
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    block_when_full: bool = False
    wait_for_ack: bool = True
    ack_timeout: float | None = None
    give_up_after: float | None = None  # seconds of waiting without an acknowledgement; None: no limit
    verify: bool | ssl.SSLContext = True
    connect_timeout: float = 10.0
    timeout: float = 30.0
    backoff: Backoff = field(default_factory=Backoff)
    auth_retry_interval: float = DEFAULT_AUTH_RETRY_INTERVAL
    fsync_interval: float = 1.0


@dataclass(frozen=True)
class SpoolStatus:
    bytes_used: int
    max_bytes: int
    oldest_event: bytes | None  # the first event not yet acknowledged, as spooled


class DeliveryStalled(Exception):
    """A replay waited `give_up_after` seconds for room in the spool without the endpoint acknowledging
    anything; the message is one line for the user. `counters`: the replay's, when it stopped."""

    counters: dict[str, int] | None = None


class Outcome(Enum):
    DELIVERED = "delivered"
    REJECTED = "rejected"  # some event in the batch is invalid: split
    REFUSED = "refused"  # token or configuration: retry slowly
    UNAVAILABLE = "unavailable"  # transient: back off


@dataclass
class Answer:
    outcome: Outcome
    reason: str = ""
    status: int | None = None
    title: str | None = None
    detail: str | None = None
    retry_after: float | None = None


class IngestSink:
    def __init__(self, settings: IngestSettings, token: TokenSource,
                 transport: httpx.BaseTransport | None = None) -> None:
        if settings.batch_size < 1 or settings.flush_interval < 0:
            raise ValueError("batch size must be at least 1 and the flush interval not negative")
        self.settings = settings
        self._token_source = token
        self._token = token.read()
        if self._token is None:
            log.warning("no API token (%s is unset and no --api-token-file): sending without Authorization",
                        token.env_name)
        elif _is_cleartext_remote(settings.endpoint):
            log.warning("the API token is sent unencrypted to %s (not https)", settings.endpoint)
        self._spool = Spool(settings.spool_dir, settings.spool_max_bytes, fsync_interval=settings.fsync_interval)
        self._dead_letters = DeadLetterFile(Path(settings.spool_dir) / DEAD_LETTER_FILE)
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
            verify=settings.verify,
            transport=transport,
            headers={"User-Agent": _user_agent()},
        )
        self._delivered = 0
        self._retried = 0
        self._batches: dict[str, int] = {}  # batches sent, by the answer's status class
        self._dropped_full = 0
        self._last_drop_log = 0.0
        self._failing_since: float | None = None
        self._last_progress = time.monotonic()  # the last acknowledgement (delivered or dead-lettered)
        self._stopped_waiting = False
        self._last_failure_log = 0.0
        self._last_problem = ""
        self._refused_problem: str | None = None
        self._reload_token = False
        self._closed = False
        self._flushing = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-delivery", daemon=True)
        self._thread.start()

    # -- Sink -----------------------------------------------------------------------------------------

    def write(self, lines: bytes) -> None:
        """Spool the events (JSON Lines) as they are; returns once they are on disk. Nothing is parsed here, on
        the pipeline's path: the delivery thread checks each event before sending it (see `_handle`). Only
        when the lines together are larger than the spool are they looked at one by one, to dead-letter an
        event that could never fit."""
        if self._closed:
            raise RuntimeError("write() after close()")
        if lines and not lines.endswith(b"\n"):
            lines += b"\n"
        if len(lines) > self._spool.max_bytes:
            lines = self._fitting_the_spool(lines)
        if lines:
            waiting_since = time.monotonic()
            refused = self._spool.append(lines, block=self.settings.block_when_full,
                                         give_up=lambda: self._stalled(waiting_since))
            if refused:
                if self.settings.block_when_full and not self._stopped_waiting and self._stalled(waiting_since):
                    raise DeliveryStalled(f"gave up: no event acknowledged for {self._give_up_text()} s while the"
                                          f" spool was full (last: {self._last_problem or 'no answer'})")
                self._count_dropped(refused)

    def _fitting_the_spool(self, lines: bytes) -> bytes:
        """The lines that the spool can hold, each alone; the others are dead-lettered."""
        kept = []
        for line in split_lines(lines):
            if len(line) + 1 > self._spool.max_bytes:
                self._dead_letter(line, f"event of {len(line)} bytes is larger than the spool (--spool-max-bytes)")
            else:
                kept.append(line + b"\n")
        return b"".join(kept)

    def stop_waiting(self) -> None:
        """A stop signal: from now on a write that finds the spool full counts the rest as `dropped_full`
        instead of waiting for room."""
        self._stopped_waiting = True
        self._spool.stop_waiting_for_room()

    def close(self, wait_for_ack: bool | None = None) -> None:
        """Send what is spooled; with `wait_for_ack` (default: the settings') return only once all of it is
        acknowledged (or `ack_timeout` passes); without, return once it is safely on disk. Either way what
        is left stays in the spool for the next start."""
        if self._closed:
            return
        self._closed = True
        wait = self.settings.wait_for_ack if wait_for_ack is None else wait_for_ack
        self._flushing.set()
        self._spool.wake()
        try:
            self._spool.sync()
            if wait:
                self._wait_for_acks()
        finally:
            self._stop.set()
            self._spool.wake()
            self._thread.join(STOP_JOIN_SECONDS)
            if not self._thread.is_alive():
                self._client.close()
            self._spool.close()
            log.info("ingest sink closed: %s", " ".join(f"{k}={v}" for k, v in self.counters().items()))

    def counters(self) -> dict[str, int]:
        """A snapshot for the summary line."""
        return {
            "delivered": self._delivered,
            "retried": self._retried,
            "dead_lettered": self._dead_letters.count,
            "dropped_full": self._dropped_full,
            "spooled_bytes": self._spool.bytes_used,
            "pending": self._spool.pending_events,
        }

    def batches_by_status(self) -> dict[str, int]:
        """Batches sent so far, by the status class of the answer (`2xx`, `4xx`, ...; `no_answer`), for
        monitoring."""
        return dict(self._batches)

    def spool_status(self) -> SpoolStatus:
        return SpoolStatus(self._spool.bytes_used, self._spool.max_bytes, self._spool.oldest_pending())

    # -- delivery thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Deliver until stopped. An unexpected error (a bug, a spool file gone) must not end delivery for
        the rest of the agent's life: it is logged, at most once a minute, and delivery resumes shortly,
        from the last acknowledged event."""
        last_logged = -UNEXPECTED_LOG_SECONDS
        while not self._stop.is_set():
            try:
                if not self._deliver_next():
                    return
            except Exception:
                if self._stop.is_set():
                    return  # the spool was closed under a delivery the stop did not wait for
                if time.monotonic() - last_logged >= UNEXPECTED_LOG_SECONDS:
                    last_logged = time.monotonic()
                    log.exception("event delivery failed unexpectedly; retrying in %.0f s (undelivered events"
                                  " stay in the spool)", UNEXPECTED_RETRY_SECONDS)
                self._spool.rewind()
                self._stop.wait(UNEXPECTED_RETRY_SECONDS)

    def _deliver_next(self) -> bool:
        """One batch, if one is ready; False when asked to stop first (the batch stays spooled)."""
        max_age = 0.0 if self._flushing.is_set() else self.settings.flush_interval
        if not self._spool.wait_ready(self.settings.batch_size, max_age, READY_POLL_SECONDS):
            return True
        batch = self._spool.read_batch(self.settings.batch_size)
        if batch is None:
            return True
        if not self._handle(batch):
            return False
        self._spool.ack(batch)
        return True

    def _handle(self, batch: Batch) -> bool:
        for line in batch.unreadable:
            self._dead_letter(line, "not a JSON object (written so, or damaged on disk)")
        lines = []
        for line in batch.lines:  # checked here, once per event read, rather than in write() on the pipeline's path
            _, reason = parse_line(line)
            if reason is None:
                lines.append(line)
            else:
                self._dead_letter(line, reason)
        return not lines or self._deliver(lines)

    def _deliver(self, lines: list[bytes]) -> bool:
        """Deliver or dead-letter every line; False when asked to stop first (the lines stay spooled)."""
        attempt = 0
        while True:
            answer = self._send(lines)
            if answer.outcome is Outcome.DELIVERED:
                self._delivered += len(lines)
                self._note_success()
                return True
            if answer.outcome is Outcome.REJECTED:
                self._note_success()
                if len(lines) == 1:
                    self._dead_letter(lines[0], answer.reason, status=answer.status,
                                      title=answer.title, detail=answer.detail)
                    return True
                half = len(lines) // 2
                return self._deliver(lines[:half]) and self._deliver(lines[half:])
            if answer.outcome is Outcome.REFUSED:
                self._note_refused(answer.reason)
                delay = self.settings.auth_retry_interval
            else:
                attempt += 1
                self._retried += 1
                delay = answer.retry_after if answer.retry_after is not None else self.settings.backoff.delay(attempt)
                self._note_unavailable(answer.reason, delay)
            if self._stop.wait(delay):
                return False

    def _send(self, lines: list[bytes]) -> Answer:
        if self._reload_token:
            try:
                self._token = self._token_source.read()
            except TokenError as exc:
                return Answer(Outcome.REFUSED, str(exc))
            self._reload_token = False
        headers = {"Content-Type": BATCH_CONTENT_TYPE}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        body = b"[" + b",".join(lines) + b"]"
        try:
            response = self._client.post(self.settings.endpoint, content=body, headers=headers)
        except httpx.RequestError as exc:
            self._count_batch("no_answer")
            return Answer(Outcome.UNAVAILABLE, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        self._count_batch(f"{response.status_code // 100}xx")
        return self._classify(response)

    def _count_batch(self, status_class: str) -> None:
        self._batches[status_class] = self._batches.get(status_class, 0) + 1

    def _classify(self, response: httpx.Response) -> Answer:
        status = response.status_code
        if 200 <= status < 300:
            return Answer(Outcome.DELIVERED, status=status)
        title, detail = (_without(text, self._token) for text in _problem(response))  # a server may echo it
        reason = f"{status} {title or response.reason_phrase}" + (f": {detail}" if detail else "")
        answer = Answer(Outcome.REFUSED, reason, status, title, detail)
        if status in (400, 413):
            answer.outcome = Outcome.REJECTED
        elif status in (408, 429) or status >= 500:
            answer.outcome = Outcome.UNAVAILABLE
            answer.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        elif status in (401, 403):
            self._reload_token = True
        elif 300 <= status < 400:
            answer.reason += f" (redirect to {response.headers.get('Location')}; use that URL)"
        return answer

    # -- what the operator sees -----------------------------------------------------------------------

    def _dead_letter(self, line: bytes, reason: str, **problem) -> None:
        try:
            self._dead_letters.add(line, reason, **problem)
        except OSError as exc:
            event, _ = parse_line(line)
            event_id = event.get("id") if isinstance(event, dict) else None
            log.error("cannot write dead-letter file %s (%s): event %r is lost: %s",
                      self._dead_letters.path, exc.strerror or exc, event_id, reason)

    def _count_dropped(self, count: int) -> None:
        self._dropped_full += count
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_SECONDS:
            self._last_drop_log = now
            log.error("spool full (%d of %d bytes, ingest endpoint not keeping up): %d new events refused so far;"
                      " raise --spool-max-bytes or restore the endpoint",
                      self._spool.bytes_used, self._spool.max_bytes, self._dropped_full)

    def _note_unavailable(self, reason: str, delay: float) -> None:
        now = time.monotonic()
        self._last_problem = reason
        if self._failing_since is None:
            self._failing_since = self._last_failure_log = now
            log.warning("ingest endpoint unavailable (%s): retrying in %.2f s; %d events spooled",
                        reason, delay, self._spool.pending_events)
        elif now - self._last_failure_log >= REPEAT_LOG_SECONDS:
            self._last_failure_log = now
            log.warning("ingest endpoint still unavailable after %.0f s (%s); %d events spooled",
                        now - self._failing_since, reason, self._spool.pending_events)

    def _note_refused(self, reason: str) -> None:
        self._last_problem = reason
        if reason != self._refused_problem:
            self._refused_problem = reason
            log.error("ingest endpoint %s refused the events (%s); they are kept and retried every %.0f s"
                      " (the token is re-read from %s)", self.settings.endpoint, reason,
                      self.settings.auth_retry_interval, self._token_source.describe())

    def _stalled(self, waiting_since: float) -> bool:
        """`give_up_after` seconds have passed, since the wait began, without an acknowledgement."""
        limit = self.settings.give_up_after
        return limit is not None and time.monotonic() - max(waiting_since, self._last_progress) >= limit

    def _give_up_text(self) -> str:
        return f"{self.settings.give_up_after:g}"

    def _note_success(self) -> None:
        self._last_progress = time.monotonic()
        if self._failing_since is not None:
            log.info("ingest endpoint reachable again after %.1f s; delivery resumed",
                     time.monotonic() - self._failing_since)
            self._failing_since = None
        if self._refused_problem is not None:
            log.info("ingest endpoint accepts the events again; delivery resumed")
            self._refused_problem = None
        self._last_problem = ""

    def _wait_for_acks(self) -> None:
        started = last_log = time.monotonic()
        timeout = self.settings.ack_timeout
        while self._spool.pending_events:
            if not self._thread.is_alive():
                log.error("delivery stopped: %d events stay in the spool", self._spool.pending_events)
                return
            if self._stalled(started):
                log.error("gave up: no event acknowledged for %s s (last: %s); %d events stay in the spool %s"
                          " for the next start", self._give_up_text(), self._last_problem or "no answer",
                          self._spool.pending_events, self.settings.spool_dir)
                return
            step = WAIT_LOG_SECONDS
            if self.settings.give_up_after is not None:
                step = min(step, max(0.05, max(started, self._last_progress) + self.settings.give_up_after
                                     - time.monotonic()))
            if timeout is not None:
                step = min(step, started + timeout - time.monotonic())
                if step <= 0:
                    log.warning("stopped waiting after %.0f s: %d events stay in the spool %s for the next start",
                                timeout, self._spool.pending_events, self.settings.spool_dir)
                    return
            if self._spool.wait_empty(step):
                return
            if time.monotonic() - last_log < WAIT_LOG_SECONDS:
                continue
            last_log = time.monotonic()
            log.info("waiting for the ingest endpoint to acknowledge %d events%s; interrupt to stop waiting"
                     " (they stay in the spool)", self._spool.pending_events,
                     f" (last: {self._last_problem})" if self._last_problem else "")


def _problem(response: httpx.Response) -> tuple[str | None, str | None]:
    """`title` and `detail` of an `application/problem+json` answer, flattened to one short line each."""
    if "json" not in response.headers.get("Content-Type", ""):
        return None, None
    try:
        problem = json.loads(response.content)
    except ValueError:
        return None, None
    if not isinstance(problem, dict):
        return None, None

    def one_line(value: object) -> str | None:
        return " ".join(str(value).split())[:300] if value else None

    return one_line(problem.get("title")), one_line(problem.get("detail"))


def _without(text: str | None, token: str | None) -> str | None:
    return text.replace(token, "[token]") if text and token else text


def _is_cleartext_remote(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def _user_agent() -> str:
    try:
        return f"kong-metering-agent/{metadata.version('kong-metering-agent')}"
    except metadata.PackageNotFoundError:
        return "kong-metering-agent"
