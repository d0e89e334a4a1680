"""Where the gateway's key-auth plugin looks for a key, so the agent looks in the same places.

The gateway may run several key-auth instances (global, per service, per route) with different settings.
Once routes are known, each route has the instance that applies to it (`agent/gateway/core_config.py`).
Without routes, the agent cannot tell which route a request matched, so it takes the union: every key name
any instance accepts, in every place any instance looks. Looking in one place too many is harmless, because
a request the gateway did not authenticate is answered 401 and is not billed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from agent.credentials.errors import CredentialError


@dataclass(frozen=True, slots=True)
class KeyAuthConfig:
    """key-auth's own defaults, so a plugin entry that omits a field means what it means to Kong."""

    key_names: tuple[str, ...] = ("apikey",)
    key_in_header: bool = True
    key_in_query: bool = True
    key_in_body: bool = False

    def describe(self) -> str:
        places = [name for name, on in (("header", self.key_in_header), ("query", self.key_in_query),
                                        ("body", self.key_in_body)) if on]
        return f"key names {', '.join(self.key_names)} in {', '.join(places) or 'nowhere'}"


_HEADER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def bad_key_name(names: Iterable[str]) -> str | None:
    """Why Kong would refuse these key names (its schema takes header names: A-Z, a-z, 0-9, `_` and `-`),
    or None: a name Kong refuses matches no request Kong authenticates."""
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            return f"bad key name {name!r}: allowed characters are A-Z, a-z, 0-9, '_' and '-'"
    return None


def is_ttl(value: object) -> bool:
    """Whether a key-auth credential's `ttl` is what Kong and decK take: whole seconds, not negative (a bool
    is not a number here, though Python counts it as one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def from_plugin_config(config: object, where: str) -> KeyAuthConfig:
    """One plugin entry's `config` (Admin API or decK), checked field by field."""
    if config is None:
        return KeyAuthConfig()
    if not isinstance(config, dict):
        raise CredentialError(f"{where}: config is not a mapping")
    defaults = KeyAuthConfig()
    names = config.get("key_names", defaults.key_names)
    if names is None:
        names = defaults.key_names
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise CredentialError(f"{where}: config.key_names is not a list of names")
    if (reason := bad_key_name(names)) is not None:
        raise CredentialError(f"{where}: config.key_names: {reason}")
    flags = {}
    for field in ("key_in_header", "key_in_query", "key_in_body"):
        value = config.get(field)
        if value is None:
            value = getattr(defaults, field)
        if not isinstance(value, bool):
            raise CredentialError(f"{where}: config.{field} is not true or false")
        flags[field] = value
    return KeyAuthConfig(key_names=tuple(names), **flags)


def merge(configs: Iterable[KeyAuthConfig]) -> KeyAuthConfig | None:
    """The union of several instances' settings; None when there is no key-auth instance at all."""
    configs = list(configs)
    if not configs:
        return None
    names: dict[str, None] = {}
    for config in configs:
        names.update(dict.fromkeys(config.key_names))
    return KeyAuthConfig(
        key_names=tuple(names),
        key_in_header=any(c.key_in_header for c in configs),
        key_in_query=any(c.key_in_query for c in configs),
        key_in_body=any(c.key_in_body for c in configs),
    )
