"""A read-mostly map from API-key digest to Consumer.

Only a SHA-256 digest of each key is held, so a memory dump, a log line or an
error message built from the table can never reveal a key.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from agent.credentials.errors import CredentialError

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Consumer:
    id: str
    username: str | None = None
    custom_id: str | None = None

    def subject(self, field: str) -> str | None:
        """The event subject for `--subject-field`; a consumer without a username falls back to its id."""
        if field == "id":
            return self.id
        if field == "custom_id":
            return self.custom_id
        return self.username or self.id

    def label(self) -> str:
        """How logs and errors name a consumer: never by key, always by something an operator can look up."""
        return self.username or self.custom_id or self.id


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class CredentialTable:
    """Immutable once built: a refresh builds a new table and swaps it in whole.

    A key may carry an expiry (Kong's key-auth `ttl`), as a time on `clock`; from then on it stops
    mapping, even if no refresh has happened since.
    """

    def __init__(
        self,
        entries: dict[bytes, Consumer] | None = None,
        expiries: dict[bytes, float] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._by_digest: dict[bytes, Consumer] = dict(entries or {})
        self._expiries: dict[bytes, float] = dict(expiries or {})
        self._clock = clock

    @classmethod
    def from_keys(cls, pairs: list[tuple[str, Consumer]]) -> "CredentialTable":
        return cls({key_digest(key): consumer for key, consumer in pairs})

    def lookup(self, key: str) -> Consumer | None:
        digest = key_digest(key)
        consumer = self._by_digest.get(digest)
        if consumer is not None and self._expiries:
            expires_at = self._expiries.get(digest)
            if expires_at is not None and self._clock() >= expires_at:
                return None
        return consumer

    def digests(self) -> frozenset[bytes]:
        return frozenset(self._by_digest)

    def consumers(self) -> frozenset[Consumer]:
        return frozenset(self._by_digest.values())

    def entries(self, field: str) -> list[tuple[bytes, str | None, str, float | None]]:
        """(digest, subject under `--subject-field` or None, consumer id, expiry) of every key, as the core's
        table is pushed: digests only, never keys. A consumer without a subject is still known by its id,
        for plugin entries scoped to it. Expiries are on this table's clock."""
        return [(digest, consumer.subject(field) or None, consumer.id, self._expiries.get(digest))
                for digest, consumer in self._by_digest.items()]

    def now(self) -> float:
        """The time on this table's clock, the one its expiries are set on."""
        return self._clock()

    def mapping(self) -> Mapping[bytes, Consumer]:
        """Read-only view digest -> consumer, for comparing two tables without any key."""
        return MappingProxyType(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)


class TableBuilder:
    """Collects keys while a source is read; refuses a key given to two consumers, which the gateway
    would refuse too, rather than silently billing one of them."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[bytes, Consumer] = {}
        self._expiries: dict[bytes, float] = {}

    def add(self, key: str, consumer: Consumer, expires_at: float | None = None) -> None:
        digest = key_digest(key)
        owner = self._entries.get(digest)
        if owner is not None and owner.id != consumer.id:
            raise CredentialError(
                f"one key is given to two consumers ({owner.label()} and {consumer.label()})"
            )
        self._entries[digest] = consumer
        if expires_at is not None:
            self._expiries[digest] = expires_at

    def build(self) -> CredentialTable:
        return CredentialTable(self._entries, self._expiries, self._clock)
