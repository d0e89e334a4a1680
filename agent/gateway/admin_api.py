"""The gateway's services, routes and plugins from Kong's Admin API (`GET /services`, `/routes`, `/plugins`),
read a page at a time by the credential source's pager, in the same load as the consumers.

Routes are ordered as Kong created them: by `created_at`, then by id. References are Kong's own
(`{"id": ...}`), so they are taken as they are: a plugin on a route made between two of the lists is
settled by the next load, as keys are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.credentials.table import Consumer
from agent.deck_file import DeckShape
from agent.gateway import entities
from agent.gateway.model import GatewayConfig, KeyAuthInstance, Names, PluginEntry, Route, Scope, Service

if TYPE_CHECKING:
    from agent.credentials.admin_api import Pager


def read_services(pages: "Pager") -> tuple[list[Service], set[str]]:
    """Every service, and the ids of the disabled ones."""
    services, disabled = [], set()
    for index, item, where in pages.items("/services"):
        try:
            service, enabled = entities.service(item, f"data[{index}]", derive_id=False)
        except DeckShape as exc:
            raise pages.malformed(where, str(exc)) from None
        services.append(service)
        if not enabled:
            disabled.add(service.id)
    return services, disabled


def read_routes(pages: "Pager") -> list[Route]:
    listed = []
    for index, item, where in pages.items("/routes"):
        try:
            service = item.get("service")
            service_id = entities.reference(service, f"data[{index}].service") if service is not None else None
            route = entities.route(item, f"data[{index}]", service_id, derive_id=False)
            created_at = item.get("created_at")
            if created_at is not None and (isinstance(created_at, bool) or not isinstance(created_at, (int, float))):
                raise DeckShape(f"data[{index}].created_at is not a number")
        except DeckShape as exc:
            raise pages.malformed(where, str(exc)) from None
        listed.append((created_at or 0, route.id, route))
    return [route for _, _, route in sorted(listed, key=lambda entry: entry[:2])]


def read_plugins(pages: "Pager", listed: list[tuple[int, dict, str]]) -> tuple[list[KeyAuthInstance],
                                                                               list[PluginEntry]]:
    """The key-auth and metering-and-billing entries among the listed plugins (index, entity, page)."""
    key_auth: list[KeyAuthInstance] = []
    metering: list[PluginEntry] = []
    for index, plugin, where in listed:
        label = f"{pages.description}: malformed page from {where}: data[{index}]"

        def scope(plugin: dict = plugin, label: str = label) -> Scope:
            return entities.plugin_scope(plugin, label, "the Admin API", lambda kind, ref: ref)

        entry_label = f"{pages.description}: plugin {plugin.get('id')}" if isinstance(plugin.get("id"), str) else label
        entities.read_plugin(plugin, label, scope, key_auth, metering, entry_label)
    return key_auth, metering


def gateway_config(services: list[Service], disabled: set[str], routes: list[Route],
                   plugins: tuple[list[KeyAuthInstance], list[PluginEntry]],
                   consumers: dict[str, Consumer]) -> GatewayConfig:
    """One configuration; `consumers` by id, so that `--plugins FILE` can name them by username."""
    names = Names(
        services={**{s.name: s.id for s in services if s.name}, **{s.id: s.id for s in services}},
        routes={**{r.name: r.id for r in routes if r.name}, **{r.id: r.id for r in routes}},
        consumers={**{c.username: c.id for c in consumers.values() if c.username}, **{c: c for c in consumers}})
    key_auth, metering = plugins
    return GatewayConfig(services=tuple(services), routes=tuple(r for r in routes if r.service_id not in disabled),
                         key_auth=tuple(key_auth), plugin_entries=tuple(metering), names=names)
