"""The dict the core's `set_gateway` takes, from the gateway's configuration and the command line's
overrides; and the checks that need both (a key must never become an attribute or a subject).

Per route, the key-auth instance that applies to it, as Kong picks one: the route's own (with or without
its service), else its service's, else the global one; key-auth cannot be scoped to a consumer. The flags
`--key-names`, `--no-key-in-header`, `--no-key-in-query` then replace those settings on every route, as
they do globally; `--subject` replaces every entry's subject.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import _core
from agent.credentials.key_auth import KeyAuthConfig
from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import GatewayConfig, KeyAuthInstance, MeteringEntry, Route, Service, Subject


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the command line says over the gateway's configuration."""

    key_names: tuple[str, ...] = ()
    no_key_in_header: bool = False
    no_key_in_query: bool = False
    subject: Subject | None = None  # `--subject` when given


def check(config: GatewayConfig, overrides: Overrides) -> None:
    """Refuses an entry whose attribute (or header/query subject) names one of key-auth's key names: any
    route's, the global one's (key-auth's default `apikey` when there is none) and `--key-names`."""
    names = [*overrides.key_names, *(name for i in config.key_auth for name in i.config.key_names)]
    names = list(dict.fromkeys(names or KeyAuthConfig().key_names))
    for entry in config.metering:
        for index, attribute in enumerate(entry.attributes):
            if _core.names_a_key(attribute.source, attribute.name, names):
                raise GatewayConfigError(f"{entry.where}: config.attributes[{index}] names one of key-auth's key"
                                         " names: a key never becomes an attribute")
        subject = entry.subject
        if overrides.subject is None and subject.field and _core.names_a_key(subject.look_up_value_in,
                                                                              subject.field, names):
            raise GatewayConfigError(f"{entry.where}: config.subject.field names one of key-auth's key names: its"
                                     " value is an API key, never a subject")


def core_gateway(config: GatewayConfig | None, overrides: Overrides) -> dict | None:
    """None when the configuration has neither routes nor metering-and-billing entries: meter everything
    on the port, as without any configuration."""
    if config is None or (not config.routes and not config.metering):
        return None
    services = {service.id: service for service in config.services}
    return {
        "routes": [_route(route, services.get(route.service_id) if route.service_id else None,
                          _key_auth(route, config.key_auth, overrides)) for route in config.routes],
        "metering": [_entry(entry, overrides) for entry in config.metering],
    }


def _route(route: Route, service: Service | None, key_auth: dict | None) -> dict:
    return {
        "id": route.id, "name": route.name,
        "service": None if service is None else {"id": service.id, "name": service.name, "port": service.port,
                                                 "protocol": service.protocol},
        "expression": route.expression, "priority": route.priority,
        "methods": list(route.methods), "hosts": list(route.hosts), "paths": list(route.paths),
        "headers": {name: list(values) for name, values in route.headers},
        "snis": list(route.snis), "protocols": list(route.protocols), "regex_priority": route.regex_priority,
        "key_auth": key_auth,
    }


def _key_auth(route: Route, instances: tuple[KeyAuthInstance, ...], overrides: Overrides) -> dict | None:
    best, best_rank = None, -1
    for instance in instances:
        scope = instance.scope
        if scope.consumer is not None or scope.route not in (None, route.id):
            continue
        if scope.service not in (None, route.service_id):
            continue
        rank = 2 * (scope.route is not None) + (scope.service is not None)
        if rank > best_rank:
            best, best_rank = instance.config, rank
    if best is None:
        return None
    return {"key_names": list(overrides.key_names or best.key_names),
            "key_in_header": best.key_in_header and not overrides.no_key_in_header,
            "key_in_query": best.key_in_query and not overrides.no_key_in_query}


def _entry(entry: MeteringEntry, overrides: Overrides) -> dict:
    subject = overrides.subject or entry.subject
    return {
        "route": entry.scope.route, "service": entry.scope.service, "consumer": entry.scope.consumer,
        "meter_api_requests": entry.meter_api_requests,
        "subject": {"look_up_value_in": subject.look_up_value_in, "field": subject.field},
        "attributes": [{"source": a.source, "name": a.name, "property": a.property} for a in entry.attributes],
        "allow_status_codes": (None if entry.allow_status_codes is None
                               else [(low, high) for low, high in entry.allow_status_codes]),
    }
