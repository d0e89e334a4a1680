"""decK state files (YAML or JSON) as both of their readers need them: the credential table
(`agent/credentials/deck.py`) and the gateway's routes, services and plugins (`agent/gateway/deck.py`),
and `--plugins FILE`, which has decK's format too.

Reading refuses what is not a state file with one line that quotes nothing from it; walking a list gives
each entry with its path (`services[2].routes[0]`) for messages. Entities without an `id` get one derived
with UUID-5 from their kind and name: stable across reloads and machines, shaped like Kong's ids, but not
the ids the gateway generated (`deck gateway dump` writes those).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.credentials.errors import CredentialError
from agent.credentials.table import Consumer
from agent.unique_keys import RepeatedKey, StrictLoader, pairs_once

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_NESTING = 1000  # a decK file is a handful of levels deep
_DERIVED_ID_NAMESPACE = uuid.UUID("5b0c6f0e-3d5a-4f5e-9a63-6b1e2c7d8f90")
_BRACKETS = re.compile(r"[\[\]{}]")


class DeckShape(Exception):
    """Where the document departs from decK's shape (a path like `consumers[3].username`)."""


def read_document(path: Path) -> dict:
    """The file's top-level mapping; CredentialError (one line, naming the file) for anything else."""
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
    return parse_document(text, name, is_json=path.suffix.lower() == ".json")


def parse_document(text: str, name: str, is_json: bool = False) -> dict:
    """A whole state file's text; `name` only labels errors."""
    document = _decode(text, name, is_json)
    if not isinstance(document, dict):
        raise CredentialError(f"{name}: not a decK state file (the top level is not a mapping)")
    if "_format_version" not in document:
        raise CredentialError(f"{name}: not a decK state file (no _format_version)")
    return document


def _decode(text: str, name: str, is_json: bool) -> object:
    if _nesting_exceeds(text, MAX_NESTING):  # libyaml would overflow the C stack: refuse before parsing
        raise CredentialError(f"{name}: nested deeper than {MAX_NESTING} levels; not a decK state file")
    if is_json:
        try:
            return json.loads(text, object_pairs_hook=pairs_once)
        except RepeatedKey:  # (JSON's reader gives no position for it)
            raise CredentialError(f"{name}: a key is repeated in one object; decK refuses such a file") from None
        except json.JSONDecodeError as exc:
            raise CredentialError(
                f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            ) from None
        except RecursionError:
            raise CredentialError(f"{name}: nested too deeply; not a decK state file") from None
    try:
        return yaml.load(text, Loader=StrictLoader)
    except RepeatedKey as exc:  # the key is not quoted: a file may hold secrets anywhere
        raise CredentialError(f"{name}: a key is repeated in one mapping at line {exc.line}, column "
                              f"{exc.column} (first at line {exc.first_line}); decK refuses such a file") from None
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


def entries(holder: dict, field: str, path: str) -> list[tuple[str, dict]]:
    """The mappings listed under `field`, each with its path for error messages."""
    items = holder.get(field)
    if items is None:
        return []
    if not isinstance(items, list):
        raise DeckShape(f"{path} is not a list")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DeckShape(f"{path}[{index}] is not a mapping")
    return [(f"{path}[{index}]", item) for index, item in enumerate(items)]


def derived_id(kind: str, name: str) -> str:
    """The id of an entity the file gives without one: `kind` is `username`, `custom_id`, `service` or
    `route`, `name` its value there."""
    return str(uuid.uuid5(_DERIVED_ID_NAMESPACE, f"{kind}:{name}"))


@dataclass(frozen=True, slots=True)
class PluginAt:
    """A plugin entry and the entity it is nested in, which scopes it as a reference would."""

    path: str                        # e.g. `services[0].routes[1].plugins[0]`
    plugin: dict
    nested_in: str | None = None     # "service", "route" or "consumer"; None at the top level
    holder: dict | None = None       # that entity, as the file gives it


def plugins(document: dict) -> list[PluginAt]:
    """Plugin entries wherever decK allows them: top level, in services, their routes, routes, consumers."""
    found = [PluginAt(path, plugin) for path, plugin in entries(document, "plugins", "plugins")]

    def nested(kind: str, entity: dict, entity_path: str) -> None:
        found.extend(PluginAt(path, plugin, kind, entity)
                     for path, plugin in entries(entity, "plugins", f"{entity_path}.plugins"))

    for s_path, service in entries(document, "services", "services"):
        nested("service", service, s_path)
        for r_path, route in entries(service, "routes", f"{s_path}.routes"):
            nested("route", route, r_path)
    for r_path, route in entries(document, "routes", "routes"):
        nested("route", route, r_path)
    for c_path, consumer in entries(document, "consumers", "consumers"):
        nested("consumer", consumer, c_path)
    return found


def enabled(plugin: dict) -> bool:
    return plugin.get("enabled", True) is not False


def consumer(entry: dict, path: str) -> Consumer:
    """A consumer entry, its id derived from its username (or custom_id) when the file gives none."""
    fields = {}
    for name in ("id", "username", "custom_id"):
        value = entry.get(name)
        if value is not None and not isinstance(value, str):
            raise DeckShape(f"{path}.{name} is not a string")
        fields[name] = value or None
    if not fields["username"] and not fields["custom_id"]:
        raise DeckShape(f"{path} has neither username nor custom_id")
    if not fields["id"]:
        kind = "username" if fields["username"] else "custom_id"
        fields["id"] = derived_id(kind, fields[kind])
    return Consumer(id=fields["id"], username=fields["username"], custom_id=fields["custom_id"])
