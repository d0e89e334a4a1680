"""Read consumers, their keys and key-auth's settings from a decK state file (YAML or JSON).

A decK consumer usually has a `username` and often an `id`. One without an `id` gets an id derived
from its username (or custom_id) with UUID-5: stable across reloads and machines, shaped like Kong's
ids, but not the id the gateway generated; when that matters, put `id` in the file (`deck gateway dump`
writes it). A key-auth credential without a `key` (the gateway then generates one) cannot be mapped and
is skipped and counted; a credential's `ttl` is ignored, since a file cannot say when the key was made.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Hashable
from pathlib import Path

import yaml

from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import KeyAuthConfig, from_plugin_config, merge
from agent.credentials.source import Snapshot
from agent.credentials.table import Consumer, TableBuilder

MAX_FILE_BYTES = 256 * 1024 * 1024
_DERIVED_ID_NAMESPACE = uuid.UUID("5b0c6f0e-3d5a-4f5e-9a63-6b1e2c7d8f90")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_NESTING = 1000  # a decK file is a handful of levels deep
_BRACKETS = re.compile(r"[\[\]{}]")


class _Shape(Exception):
    """Where the document departs from decK's shape (a path like `consumers[3].username`)."""


def load_deck_file(path: Path) -> Snapshot:
    name = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CredentialError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise CredentialError(f"{name}: is a directory, not a decK state file") from None
    except OSError as exc:
        raise CredentialError(f"{name}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise CredentialError(f"{name}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CredentialError(f"{name}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return parse_deck(text, name, is_json=path.suffix.lower() == ".json")


def parse_deck(text: str, name: str, is_json: bool = False) -> Snapshot:
    """Parse a whole state file; `name` only labels errors. Error messages quote no value from the file."""
    document = _decode(text, name, is_json)
    if not isinstance(document, dict):
        raise CredentialError(f"{name}: not a decK state file (the top level is not a mapping)")
    if "_format_version" not in document:
        raise CredentialError(f"{name}: not a decK state file (no _format_version)")
    try:
        builder = TableBuilder()
        skipped = _read_consumers(document, builder)
        key_auth = merge(_key_auth_configs(document))
    except _Shape as exc:
        raise CredentialError(f"{name}: {exc}") from None
    except CredentialError as exc:
        raise CredentialError(f"{name}: {exc}") from None
    return Snapshot(builder.build(), key_auth, skipped)


def _decode(text: str, name: str, is_json: bool) -> object:
    if _nesting_exceeds(text, MAX_NESTING):  # libyaml would overflow the C stack: refuse before parsing
        raise CredentialError(f"{name}: nested deeper than {MAX_NESTING} levels; not a decK state file")
    if is_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise CredentialError(
                f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            ) from None
        except RecursionError:
            raise CredentialError(f"{name}: nested too deeply; not a decK state file") from None
    try:
        return yaml.load(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        # Only the problem and its position: the exception's own text quotes the offending line.
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CredentialError(f"{name}: not valid YAML ({exc.problem or 'parse error'}{where})") from None
    except yaml.YAMLError:
        raise CredentialError(f"{name}: not valid YAML") from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        # a tag YAML cannot build (`!!int <key>`, `!!timestamp x`): the exception's text quotes the value
        raise CredentialError(f"{name}: a value cannot be read as its YAML tag says ({type(exc).__name__})") from None


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether brackets open deeper than `limit` (quoted ones counted too: an overestimate, and only
    looked at when there are that many brackets at all)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth += 1 if match.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def _read_consumers(document: dict, builder: TableBuilder) -> int:
    skipped = 0
    for c_path, entry in _entries(document, "consumers", "consumers"):
        consumer = _consumer(entry, c_path)
        for k_path, credential in _entries(entry, "keyauth_credentials", f"{c_path}.keyauth_credentials"):
            key = credential.get("key")
            if key is None:
                skipped += 1
                continue
            if not isinstance(key, str) or not key:
                raise _Shape(f"{k_path}.key is not a non-empty string")
            builder.add(key, consumer)
    return skipped


def _consumer(entry: dict, path: str) -> Consumer:
    fields = {}
    for field in ("id", "username", "custom_id"):
        value = entry.get(field)
        if value is not None and not isinstance(value, str):
            raise _Shape(f"{path}.{field} is not a string")
        fields[field] = value or None
    if not fields["username"] and not fields["custom_id"]:
        raise _Shape(f"{path} has neither username nor custom_id")
    if not fields["id"]:
        basis = f"username:{fields['username']}" if fields["username"] else f"custom_id:{fields['custom_id']}"
        fields["id"] = str(uuid.uuid5(_DERIVED_ID_NAMESPACE, basis))
    return Consumer(id=fields["id"], username=fields["username"], custom_id=fields["custom_id"])


def _key_auth_configs(document: dict) -> list[KeyAuthConfig]:
    """key-auth entries wherever decK allows plugins: top level, in services, their routes, and routes."""
    holders: list[tuple[str, dict]] = [("", document)]
    for s_path, service in _entries(document, "services", "services"):
        holders.append((f"{s_path}.", service))
        holders.extend((f"{r_path}.", route) for r_path, route in _entries(service, "routes", f"{s_path}.routes"))
    holders.extend((f"{r_path}.", route) for r_path, route in _entries(document, "routes", "routes"))
    configs = []
    for prefix, holder in holders:
        for p_path, plugin in _entries(holder, "plugins", f"{prefix}plugins"):
            if plugin.get("name") == "key-auth" and plugin.get("enabled", True) is not False:
                configs.append(from_plugin_config(plugin.get("config"), p_path))
    return configs


def _entries(holder: dict, field: str, path: str) -> list[tuple[str, dict]]:
    """The mappings listed under `field`, each with its path for error messages."""
    items = holder.get(field)
    if items is None:
        return []
    if not isinstance(items, list):
        raise _Shape(f"{path} is not a list")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _Shape(f"{path}[{index}] is not a mapping")
    return [(f"{path}[{index}]", item) for index, item in enumerate(items)]


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
