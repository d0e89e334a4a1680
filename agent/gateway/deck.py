"""The gateway's services, routes and plugins from a decK state file.

Routes are `services[].routes[]` (their service is the one they are nested in) and the top-level `routes`
(whose `service` names one by name or id), in file order, which is the order decK creates them in. An
entity without an `id` gets one derived from its name (`agent/deck_file.py`), so a route keeps its id
across reloads; `deck gateway dump` writes Kong's own ids, and with them the events carry the ids Kong's
plugin would send. Plugin references (`service`, `route`, `consumer`: a name, a username or an id) are
resolved to ids; one that names nothing in the file is refused, as decK refuses it.
"""

from __future__ import annotations

from agent.credentials.errors import CredentialError
from agent.deck_file import DeckShape, PluginAt, consumer, entries, plugins
from agent.gateway import entities
from agent.gateway.model import GatewayConfig, KeyAuthInstance, Names, PluginEntry, Route, Scope, Service


def gateway_from_deck(document: dict, name: str) -> GatewayConfig:
    """`name` labels messages (the file's name); every error is one line that begins with it."""
    try:
        return _read(document, name)
    except DeckShape as exc:
        raise CredentialError(f"{name}: {exc}") from None


def _read(document: dict, name: str) -> GatewayConfig:
    names = Names()
    services: list[Service] = []
    routes: list[Route] = []
    disabled: set[str] = set()

    def add_route(entity: dict, path: str, service_id: str | None) -> None:
        route = entities.route(entity, path, service_id, derive_id=True)
        routes.append(route)
        names.routes.update({route.id: route.id, **({route.name: route.id} if route.name else {})})

    for s_path, entity in entries(document, "services", "services"):
        service, enabled = entities.service(entity, s_path, derive_id=True)
        services.append(service)
        if not enabled:
            disabled.add(service.id)
        names.services.update({service.id: service.id, **({service.name: service.id} if service.name else {})})
        for r_path, route in entries(entity, "routes", f"{s_path}.routes"):
            add_route(route, r_path, service.id)
    for r_path, route in entries(document, "routes", "routes"):
        ref = route.get("service")
        service_id = None
        if ref is not None:
            service_id = names.services.get(entities.reference(ref, f"{r_path}.service"))
            if service_id is None:
                raise DeckShape(f"{r_path}.service names no service in the file")
        add_route(route, r_path, service_id)
    for c_path, entity in entries(document, "consumers", "consumers"):
        owner = consumer(entity, c_path)
        names.consumers.update({owner.id: owner.id, **({owner.username: owner.id} if owner.username else {})})
    key_auth, metering = read_plugins(plugins(document), name, "the file", names)
    return GatewayConfig(services=tuple(services), routes=tuple(r for r in routes if r.service_id not in disabled),
                         key_auth=tuple(key_auth), plugin_entries=tuple(metering), names=names)


def read_plugins(found: list[PluginAt], name: str, among: str,
                 names: Names) -> tuple[list[KeyAuthInstance], list[PluginEntry]]:
    """The key-auth and metering-and-billing entries among `found`, scoped by ids looked up in `names`
    (`among` says whose entities those are, in messages)."""
    key_auth: list[KeyAuthInstance] = []
    metering: list[PluginEntry] = []
    for at in found:
        label = f"{name}: {at.path}"

        def scope(at: PluginAt = at, label: str = label) -> Scope:
            nested = (at.nested_in, holder_ref(at)) if at.nested_in else None
            return entities.plugin_scope(at.plugin, label, among, names.resolve, nested)

        entities.read_plugin(at.plugin, label, scope, key_auth, metering)
    return key_auth, metering


def holder_ref(at: PluginAt) -> str:
    """The id (or, failing that, the name) of the entity a plugin entry is nested in."""
    holder = at.holder or {}
    path = at.path.rpartition(".plugins")[0]
    if at.nested_in == "consumer" and not holder.get("id") and not holder.get("username"):
        return consumer(holder, path).id  # only a custom_id: the derived id
    for field in ("id", "username" if at.nested_in == "consumer" else "name"):
        value = holder.get(field)
        if isinstance(value, str) and value:
            return value
    raise DeckShape(f"{path} has neither id nor name")
