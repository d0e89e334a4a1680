"""The billing rules: which exchanges become events.

One event per request whose subject resolves and whose final status is not 401 (key-auth's rejection,
so a key the table still knows but the gateway has revoked is not billed; a 401 that Kong proxied from
the upstream service is billed). No subject: dropped and
counted, as Kong's plugin drops it. While the credential table has not loaded yet, exchanges are held
(up to a bound) rather than dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.credentials.key_auth import KeyAuthConfig
from agent.http.exchanges import Exchange
from agent.metering.events import build_event
from agent.metering.subject import NOT_READY, SubjectResolver

log = logging.getLogger(__name__)


@dataclass
class MeterCounters:
    events: int = 0
    rejected: int = 0        # answered 401 by the gateway
    unresolved: int = 0      # no subject
    held: int = 0            # waiting for the credential table right now
    held_overflow: int = 0   # dropped (and counted unresolved) because too many were waiting


class Meter:
    def __init__(self, resolver: SubjectResolver, source: str, key_auth: Callable[[], KeyAuthConfig],
                 max_held: int = 100_000) -> None:
        self.resolver = resolver
        self.source = source
        self.key_auth = key_auth
        self.max_held = max_held
        self.counters = MeterCounters()
        self._held: deque[Exchange] = deque()

    def meter(self, exchanges: list[Exchange]) -> list[dict]:
        """The events of these exchanges, after those of any held ones the credential table now resolves
        (with none, it only releases those: live capture calls it every second even when idle)."""
        events: list[dict] = []
        if self._held and self.resolver.ready():
            self._release(events)
        for exchange in exchanges:
            self._meter_one(exchange, events)
        return events

    def _release(self, events: list[dict]) -> None:
        held, self._held = self._held, deque()
        self.counters.held = 0
        for exchange in held:
            self._meter_one(exchange, events)

    def _meter_one(self, exchange: Exchange, events: list[dict]) -> None:
        if exchange.status == 401 and not _proxied(exchange):
            self.counters.rejected += 1
            return
        request = exchange.request
        assert request is not None
        subject, key = self.resolver.resolve(request)
        if subject is NOT_READY:
            self._hold(exchange)
            return
        if subject is None:
            self.counters.unresolved += 1
            return
        subject_type, key_names = self.resolver.rule.look_up_value_in, self.key_auth().key_names
        event = build_event(exchange, subject, subject_type, self.source, key_names, key)  # type: ignore[arg-type]
        events.append(event)
        self.counters.events += 1

    def _hold(self, exchange: Exchange) -> None:
        if len(self._held) >= self.max_held:
            self._held.popleft()
            self.counters.held_overflow += 1
            self.counters.unresolved += 1
            if self.counters.held_overflow == 1:
                log.error("credential table still not loaded: %d requests waiting, dropping the oldest "
                          "(counted as unresolved)", self.max_held)
        self._held.append(exchange)
        self.counters.held = len(self._held)


def _proxied(exchange: Exchange) -> bool:
    """A 401 that Kong passed on from the upstream service (it adds X-Kong-Upstream-Latency to what it
    proxies): key-auth let the consumer in, so the request is billed as Kong's plugin bills it."""
    response = exchange.response
    return response is not None and response.header("x-kong-upstream-latency") is not None
