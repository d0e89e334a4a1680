"""Services, routes and plugin entries, read the same way from a decK file and from Admin API pages.

Shape errors are `DeckShape` with the entity's path (`services[1].routes[0].paths`); the caller says which
file or page it is. Kong's defaults fill what a source leaves out: a service's protocol `http` and port 80
(from `url`: the scheme, and the URL's port, else 443 for https and 80 otherwise, as Kong's `url`
shorthand does); a route's protocols `["http", "https"]`, `regex_priority` 0, `priority` 0.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from agent.credentials.key_auth import from_plugin_config
from agent.deck_file import DeckShape, derived_id, enabled
from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import KeyAuthInstance, PluginEntry, Route, Scope, Service
from agent.gateway.plugin_config import NAME as METERING

KINDS = ("route", "service", "consumer")
_ROUTE_LISTS = ("methods", "hosts", "paths", "snis", "protocols")


def service(entity: dict, path: str, derive_id: bool) -> tuple[Service, bool]:
    """The service and whether it is enabled (a disabled one's routes answer 404, as if they did not exist)."""
    name = _string(entity, "name", path)
    service_id = _entity_id(entity, path, "service", name, derive_id)
    url = _string(entity, "url", path)
    if url:
        protocol, port = _from_url(url, f"{path}.url")
    else:
        protocol = _string(entity, "protocol", path) or "http"
        port = _integer(entity, "port", path, 0, 65535)
        port = 80 if port is None else port
    on = entity.get("enabled", True)
    if not isinstance(on, bool) and on is not None:
        raise DeckShape(f"{path}.enabled is not true or false")
    return Service(service_id, name, port, protocol), on is not False


def _from_url(url: str, path: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DeckShape(f"{path} is not a URL") from None
    if not parts.scheme:
        raise DeckShape(f"{path} has no scheme")
    protocol = parts.scheme.lower()
    return protocol, port if port is not None else (443 if protocol == "https" else 80)


def route(entity: dict, path: str, service_id: str | None, derive_id: bool) -> Route:
    name = _string(entity, "name", path)
    lists = {field: _strings(entity, field, path) for field in _ROUTE_LISTS}
    for index, route_path in enumerate(lists["paths"]):
        if route_path.startswith("${{"):
            raise DeckShape(f"{path}.paths[{index}]: decK templates are read only in the metering plugin's"
                            " api_token and ingest_endpoint; give the path")
        if not route_path.startswith(("/", "~/")):  # as Kong's schema, which refuses such a route
            raise DeckShape(f"{path}.paths[{index}]: {route_path!r} does not start with / (a prefix) or ~/ (a regex)")
    protocols = lists.pop("protocols") or ("http", "https")
    priority = _integer(entity, "priority", path, 0, 2**46)  # Kong's bounds for both
    regex_priority = _integer(entity, "regex_priority", path, -2**31, 2**31 - 1)
    return Route(
        id=_entity_id(entity, path, "route", name, derive_id), name=name, service_id=service_id,
        expression=_string(entity, "expression", path), priority=priority or 0,
        headers=_headers(entity.get("headers"), f"{path}.headers"), protocols=protocols,
        regex_priority=regex_priority or 0, **lists)


def _entity_id(entity: dict, path: str, kind: str, name: str | None, derive_id: bool) -> str:
    given = _string(entity, "id", path)
    if given:
        return given
    if not derive_id:
        raise DeckShape(f"{path}.id is not a string")
    if not name:
        raise DeckShape(f"{path} has neither id nor name")
    return derived_id(kind, name)


def _string(entity: dict, field: str, path: str) -> str | None:
    value = entity.get(field)
    if value is not None and not isinstance(value, str):
        raise DeckShape(f"{path}.{field} is not a string")
    return value or None


def _integer(entity: dict, field: str, path: str, low: int, high: int) -> int | None:
    value = entity.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise DeckShape(f"{path}.{field} is not a whole number")
    if value is not None and not low <= value <= high:
        raise DeckShape(f"{path}.{field} is not between {low} and {high}")
    return value


def _strings(entity: dict, field: str, path: str) -> tuple[str, ...]:
    value = entity.get(field)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DeckShape(f"{path}.{field} is not a list of strings")
    return tuple(value)


def _headers(headers: object, path: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if headers is None:
        return ()
    if not isinstance(headers, dict):
        raise DeckShape(f"{path} is not a mapping")
    read = []
    for name, values in headers.items():
        if isinstance(values, str):
            values = [values]
        if (not isinstance(name, str) or not isinstance(values, list)
                or not all(isinstance(value, str) for value in values)):
            raise DeckShape(f"{path} is not a mapping of header names to lists of values")
        read.append((name, tuple(values)))
    return tuple(read)


def reference(value: object, path: str) -> str:
    """A reference as decK writes it (a name or an id) or as the Admin API does (`{"id": ...}`)."""
    if isinstance(value, dict):
        value = value.get("id") or value.get("name") or value.get("username")
    if not isinstance(value, str) or not value:
        raise DeckShape(f"{path} is not a name or an id")
    return value


Lookup = Callable[[str, str], "str | None"]  # (kind, name or id) -> id, None when there is no such entity


def plugin_scope(plugin: dict, label: str, among: str, lookup: Lookup, nested: tuple[str, str] | None = None) -> Scope:
    """The ids a plugin entry is scoped to: its own references, and the entity it is nested in (`nested`:
    that entity's kind and name or id). A reference to nothing `among` the source's entities is refused,
    as decK refuses it."""
    ids: dict[str, str] = {}
    for kind in KINDS:
        if plugin.get(kind) is not None:
            try:
                ref = reference(plugin[kind], kind)
            except DeckShape as exc:
                raise GatewayConfigError(f"{label}.{exc}") from None
            ids[kind] = _resolved(kind, ref, f"{label}.{kind}", among, lookup)
    if nested is not None:
        kind, ref = nested
        resolved = _resolved(kind, ref, f"{label} (nested in a {kind})", among, lookup)
        if ids.get(kind, resolved) != resolved:
            raise GatewayConfigError(f"{label}.{kind} is not the {kind} the entry is nested in")
        ids[kind] = resolved
    return Scope(**ids)


def _resolved(kind: str, ref: str, label: str, among: str, lookup: Lookup) -> str:
    resolved = lookup(kind, ref)
    if resolved is None:
        raise GatewayConfigError(f"{label} names no {kind} of {among}")
    return resolved


def read_plugin(plugin: dict, label: str, scope: Callable[[], Scope], key_auth: list[KeyAuthInstance],
                metering: list[PluginEntry], entry_label: str | None = None) -> None:
    """Keeps an enabled key-auth or a metering-and-billing entry (a disabled one only as such; others do
    not concern the agent). `label`
    names the entry in messages (`entry_label`, if given, once it is kept); `scope` is only worked out
    for these two, so a reference in another plugin is never a reason to refuse a file."""
    name = plugin.get("name")
    if name not in ("key-auth", METERING) or (name == "key-auth" and not enabled(plugin)):
        return
    if name == METERING and not enabled(plugin):
        metering.append(PluginEntry(entry_label or label, scope(), None, enabled=False))
        return
    if name == "key-auth":
        key_auth.append(KeyAuthInstance(scope(), from_plugin_config(plugin.get("config"), label)))
        return
    entry_label = entry_label or label
    for unsupported in ("consumer_group", "condition"):
        if plugin.get(unsupported) is not None:
            raise GatewayConfigError(f"{entry_label}: a {METERING} entry with a {unsupported} is not supported"
                                     " (the agent cannot tell which requests it covers)")
    metering.append(PluginEntry(entry_label, scope(), plugin.get("config")))
