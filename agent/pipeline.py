"""The data plane as the control plane drives it: the core's pipeline, kept in step with the gateway.

Every stage runs in the Rust core (`agent._core.Pipeline`): frames in, JSON Lines of events out, one call
per batch. What changes while the agent runs (key-auth's settings, the credential table, the gateway's
routes and Metering & Billing entries) lives in Python; before each batch this wrapper pushes into the
core whatever of it has changed since the last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent import _core
from agent.credentials.key_auth import KeyAuthConfig
from agent.credentials.table import CredentialTable
from agent.metering.subject import SubjectRule

log = logging.getLogger("agent.pipeline")

KeyAuthSource = Callable[[], KeyAuthConfig]
TableSource = Callable[[], "CredentialTable | None"]
GatewaySource = Callable[[], "dict | None"]
HandedOver = tuple[bytes, int, bytes, int, list[str], "tuple[int, str] | None", int]  # see `Pipeline.answers_owed`


class Pipeline:
    def __init__(self, core: _core.Pipeline, rule: SubjectRule, key_auth: KeyAuthSource, table: TableSource,
                 gateway_key_auth: Callable[[], KeyAuthConfig | None] = lambda: None,
                 gateway: GatewaySource = lambda: None) -> None:
        self.core = core
        self.rule = rule
        self._key_auth = key_auth
        self._table = table
        self._gateway_key_auth = gateway_key_auth  # the gateway's own settings, before flags override them
        self._pushed_gateway: object = None
        self._pushed_key_auth: KeyAuthConfig | None = None
        self._pushed_table: object = object()
        self._gateway = gateway  # routes and plugin entries, as `_core.Pipeline.set_gateway` takes them
        self._pushed_config: object = None
        self._logged = {"held_overflow": 0, "internal_errors": 0}

    def feed_capture(self, capture: _core.CaptureFile, max_frames: int) -> tuple[bytes, bool]:
        """The capture's next frames (the core reads them itself, without the GIL); also whether any remain."""
        lines, more = self.core.feed_capture(capture, max_frames, self._sync())
        return self._after(lines), more

    def feed_ring(self, ring: _core.Ring, max_blocks: int) -> tuple[bytes, int]:
        """Up to `max_blocks` of the ring's ready blocks; also how many there were."""
        lines, blocks = self.core.feed_ring(ring, max_blocks, self._sync())
        return self._after(lines), blocks

    def feed_tls(self, probes: _core.TlsProbes, max_records: int) -> tuple[bytes, int, list[int]]:
        """Up to `max_records` of the TLS probes' records; also how many there were, and the processes the
        probes saw exit."""
        lines, records, exited = self.core.feed_tls(probes, max_records, self._sync())
        return self._after(lines), records, exited

    def tick(self, capture_time: float) -> bytes:
        """Let time pass without packets (a quiet live interface): expire what has waited too long."""
        return self._after(self.core.tick(capture_time, self._sync()))

    def leave_new_requests(self, resume: bool) -> None:
        """A stop's boundary in the packet capture: the requests the next run will take (it reads the ring on
        from here) are left to it; the others are still finished by this one. `resume`: the next run gets
        `answers_owed`, which then also say where each client's next request begins."""
        self.core.leave_new_requests(resume)

    def requests_in_flight(self) -> int:
        """Requests from the packet capture this run bills that still wait for their answer."""
        return self.core.requests_in_flight()

    def answers_owed(self) -> list[HandedOver]:
        """After `leave_new_requests`: per connection (client and server address and port), the methods of
        this run's requests whose answers the next run will see and must not take for its own, the client's
        sequence number where its next request begins (None if not known), and how many restarts this was
        carried through for a connection not seen since."""
        return self.core.answers_owed()

    def expect_answers(self, owed: list[HandedOver]) -> None:
        """The previous run's `answers_owed`, before the first frame."""
        self.core.expect_answers(owed)

    def finish(self) -> bytes:
        """The capture is over: close every connection, so requests still in flight are emitted too."""
        return self._after(self.core.finish(self._sync()))

    @property
    def held(self) -> int:
        """Requests waiting for the credential table right now."""
        return self.core.held

    def counters(self) -> dict[str, int]:
        """Everything counted along the way, by stage; the summary line is made from it."""
        return self.core.counters()

    def _sync(self) -> float:
        """Push what changed into the core; returns the credential table's now (its key expiries are on
        its own clock)."""
        key_auth = self._key_auth()
        if key_auth is not self._pushed_key_auth and key_auth != self._pushed_key_auth:
            self._pushed_key_auth = key_auth
            self.core.set_key_auth(list(key_auth.key_names), key_auth.key_in_header, key_auth.key_in_query)
            self._check_rule()
        gateway = self._gateway_key_auth()
        if gateway is not self._pushed_gateway:
            self._pushed_gateway = gateway
            if self.core.set_gateway_key_names(list(gateway.key_names) if gateway is not None else []):
                self._check_rule()
        config = self._gateway()
        if config is not self._pushed_config:
            self._pushed_config = config
            try:
                refused_routes = self.core.set_gateway(config)
            except ValueError as error:  # the control plane checks the configuration first: a bug if seen
                log.error("the gateway's configuration could not be applied (%s); the last one stays", error)
                refused_routes = []
            for refused in refused_routes:
                log.warning("%s; requests it would match are not metered (counted no_route)", refused)
            self._check_rule()
        table = self._table()
        if table is not self._pushed_table:
            self._pushed_table = table
            self.core.set_credentials(table.entries(self.rule.field) if table is not None else None)
        return table.now() if table is not None else 0.0

    def _check_rule(self) -> None:
        """The gateway's key-auth settings arrive after the flags were checked (and may change): a header or
        query subject that is now one of the key names would be an API key; the core leaves such requests
        unresolved, and this says why, once per change."""
        if self.core.subject_names_a_key:
            log.error("--subject %s:%s names one of key-auth's key names: its value is an API key, never a subject;"
                      " requests stay unresolved", self.rule.look_up_value_in, self.rule.field)

    def _after(self, lines: bytes) -> bytes:
        """Says once each what the core can only count: requests dropped while the table is missing (or to
        stay within --max-memory), and frames the core failed on (a bug: counted; the connections open
        then are dropped and the capture goes on)."""
        counters = self.core.counters()
        if counters["held_overflow"] and not self._logged["held_overflow"]:
            log.error("credential table still not loaded: too many requests waiting (or too many bytes for"
                      " --max-memory), dropping the oldest (counted as unresolved)")
        if counters["internal_errors"] > self._logged["internal_errors"]:
            log.error("%d frames could not be processed and the connections open then were dropped (an internal"
                      " error; please report it)",
                      counters["internal_errors"] - self._logged["internal_errors"])
        self._logged = {name: counters[name] for name in self._logged}
        return lines


def summary_line(counters: dict[str, int]) -> str:
    return "summary: " + " ".join(f"{name}={value}" for name, value in counters.items())
