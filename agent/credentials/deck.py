"""Read consumers, their keys and key-auth's settings from a decK state file (YAML or JSON), and with them
the gateway's services, routes and plugins (`agent/gateway/deck.py`).

A decK consumer usually has a `username` and often an `id`. One without an `id` gets an id derived
from its username (or custom_id) with UUID-5 (`agent/deck_file.py`): stable across reloads and machines,
shaped like Kong's ids, but not the id the gateway generated; when that matters, put `id` in the file
(`deck gateway dump` writes it). Two consumers with one username, custom_id or id are refused, as decK
refuses them. A key-auth credential without a `key` (the gateway then generates one) cannot be mapped and
is skipped and counted; a credential's `ttl` must be whole seconds, as decK requires, but is otherwise
ignored, since a file cannot say when the key was made.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path

from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import is_ttl, merge
from agent.credentials.source import Snapshot
from agent.credentials.table import Consumer, TableBuilder
from agent.deck_file import DeckShape, consumer, entries, parse_document, read_document
from agent.gateway.deck import gateway_from_deck


def load_deck_file(path: Path) -> Snapshot:
    return _snapshot(read_document(path), str(path))


def parse_deck(text: str, name: str, is_json: bool = False) -> Snapshot:
    """Parse a whole state file; `name` only labels errors. Error messages quote no value from the file."""
    return _snapshot(parse_document(text, name, is_json), name)


def _snapshot(document: dict, name: str) -> Snapshot:
    try:
        builder = TableBuilder()
        skipped = _read_consumers(document, builder)
    except DeckShape as exc:
        raise CredentialError(f"{name}: {exc}") from None
    except CredentialError as exc:
        raise CredentialError(f"{name}: {exc}") from None
    gateway = gateway_from_deck(document, name)  # its messages name the file themselves
    return Snapshot(builder.build(), merge(i.config for i in gateway.key_auth), skipped, gateway)


def _read_consumers(document: dict, builder: TableBuilder) -> int:
    skipped = 0
    claimed: dict[tuple[str, str], str] = {}  # (field, value) -> path of the consumer that has it
    for c_path, entry in entries(document, "consumers", "consumers"):
        owner = consumer(entry, c_path)
        _claim(claimed, owner, c_path)
        for k_path, credential in entries(entry, "keyauth_credentials", f"{c_path}.keyauth_credentials"):
            if credential.get("ttl") is not None and not is_ttl(credential["ttl"]):
                raise DeckShape(f"{k_path}.ttl is not a non-negative integer")
            key = credential.get("key")
            if key is None:
                skipped += 1
                continue
            if not isinstance(key, str) or not key:
                raise DeckShape(f"{k_path}.key is not a non-empty string")
            builder.add(key, owner)
    return skipped


def _claim(claimed: dict[tuple[str, str], str], owner: Consumer, path: str) -> None:
    """Refuses a username, custom_id or id given to two consumers: decK and the gateway refuse it too,
    and merging the two would bill one for the other's keys."""
    for field in ("username", "custom_id", "id"):
        value = getattr(owner, field)
        if value is None:
            continue
        first = claimed.setdefault((field, value), path)
        if first != path:
            raise DeckShape(f"one {field} ({value}) is given to two consumers ({first} and {path})")


class DeckFileSource:
    """A decK file watched by its stat, so an edit (or an editor's write-and-rename) is noticed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def description(self) -> str:
        return f"decK file {self.path}"

    def load(self) -> Snapshot:
        return load_deck_file(self.path)

    def fingerprint(self) -> Hashable | None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return ("unreadable", exc.errno)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
