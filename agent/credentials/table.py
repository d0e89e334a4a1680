"""A read-mostly map from API-key digest to Consumer.

Only a SHA-256 digest of each key is held, so a memory dump, a log line or an
error message built from the table can never reveal a key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


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


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class CredentialTable:
    """Immutable once built: a refresh builds a new table and swaps it in whole."""

    def __init__(self, entries: dict[bytes, Consumer] | None = None) -> None:
        self._by_digest: dict[bytes, Consumer] = dict(entries or {})

    @classmethod
    def from_keys(cls, pairs: list[tuple[str, Consumer]]) -> "CredentialTable":
        return cls({key_digest(key): consumer for key, consumer in pairs})

    def lookup(self, key: str) -> Consumer | None:
        return self._by_digest.get(key_digest(key))

    def digests(self) -> frozenset[bytes]:
        return frozenset(self._by_digest)

    def consumers(self) -> frozenset[Consumer]:
        return frozenset(self._by_digest.values())

    def __len__(self) -> int:
        return len(self._by_digest)
