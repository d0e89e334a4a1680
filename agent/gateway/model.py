"""What the agent reads of the gateway's configuration: plain immutable values, compared whole so that a
reload that changes nothing changes nothing downstream."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.credentials.key_auth import KeyAuthConfig


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    name: str | None
    port: int | None
    protocol: str | None


@dataclass(frozen=True, slots=True)
class Route:
    """A route as Kong stores it, with Kong's defaults filled in where the source leaves a field out."""

    id: str
    name: str | None
    service_id: str | None
    expression: str | None = None
    priority: int = 0
    methods: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    snis: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ("http", "https")
    regex_priority: int = 0


@dataclass(frozen=True, slots=True)
class Scope:
    """Which requests a plugin entry applies to, by id: every field set must match; none set is global."""

    route: str | None = None
    service: str | None = None
    consumer: str | None = None


@dataclass(frozen=True, slots=True)
class KeyAuthInstance:
    scope: Scope
    config: KeyAuthConfig


@dataclass(frozen=True, slots=True)
class PluginEntry:
    """A metering-and-billing entry as the source gives it: its config is read later, and only if it is
    enabled and used (`--plugins FILE` replaces these)."""

    where: str          # names the entry in messages: a decK path, or the Admin API plugin's id
    scope: Scope
    config: object
    enabled: bool = True  # a disabled one bills nothing, but says the plugin is configured


class Secret:
    """A value that must never reach a log line or a message: its repr hides it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Subject:
    look_up_value_in: str = "consumer"  # consumer | header | query
    field: str | None = None             # the header (lower-cased) or query parameter; None for consumer


@dataclass(frozen=True, slots=True)
class Attribute:
    source: str     # header | query
    name: str       # the header (lower-cased) or query parameter
    property: str   # the key it is put under in the event's data


@dataclass(frozen=True, slots=True)
class MeteringEntry:
    """One metering-and-billing entry's config, read, checked and in its current spelling."""

    where: str
    scope: Scope
    meter_api_requests: bool = True
    subject: Subject = Subject()
    attributes: tuple[Attribute, ...] = ()
    allow_status_codes: tuple[tuple[int, int], ...] | None = None
    ingest_endpoint: str | None = None
    api_token: Secret | None = None


@dataclass(frozen=True, slots=True)
class Names:
    """References by name or id, resolved to ids: how decK entries and `--plugins FILE` name entities."""

    services: dict[str, str] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, str] = field(default_factory=dict)

    def resolve(self, kind: str, ref: str) -> str | None:
        return getattr(self, f"{kind}s").get(ref)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """One source's services, routes (in the order Kong created them), key-auth instances and
    metering-and-billing entries; `metering` holds the read entries once the source is combined with
    `--plugins` (see `agent/gateway/source.py`)."""

    services: tuple[Service, ...] = ()
    routes: tuple[Route, ...] = ()
    key_auth: tuple[KeyAuthInstance, ...] = ()
    plugin_entries: tuple[PluginEntry, ...] = ()
    names: Names = Names()
    metering: tuple[MeteringEntry, ...] = ()
    # some entry exists, enabled or not: then only the enabled entries' scopes are metered (all disabled:
    # nothing), rather than everything as without the plugin
    plugin_configured: bool = False
