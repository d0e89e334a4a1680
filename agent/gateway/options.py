"""`--plugins FILE`, and what the command line takes from the gateway's configuration: the dict the core
routes and meters by, and the ingest endpoint and token the metering-and-billing entries name.

Precedence, highest first: the command line (`--ingest-endpoint`, `--output`, `--subject`, `--key-names`,
`--no-key-in-header`, `--no-key-in-query`), then `--plugins FILE`, then the gateway's own configuration
(decK file or Admin API), then Kong's defaults. The token: `--api-token-file`, then `$METERING_API_TOKEN`,
then the entries' `api_token` (only when the endpoint in use is the one the entries name).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.credentials.source import CredentialSource
from agent.credentials.sync import CredentialSync
from agent.gateway.core_config import Overrides, core_gateway
from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import GatewayConfig, Secret, Subject
from agent.gateway.plugin_config import NAME
from agent.gateway.plugins_file import PluginsFile
from agent.gateway.secrets import PluginToken, resolve
from agent.gateway.source import GatewaySource
from agent.tokens import TokenError, shown_url

log = logging.getLogger("agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the gateway's configuration (routes, services, the metering plugin)")
    group.add_argument(
        "--plugins", metavar="FILE", type=Path,
        help=f"{NAME} entries in decK's format, for a gateway that cannot hold them (Kong OSS); they replace"
             " the gateway's own and are re-read when the file changes")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.plugins is not None and not args.credentials:
        parser.error("argument --plugins: needs --credentials (its entries are scoped by the gateway's services,"
                     " routes and consumers)")


def overrides_from_args(args: argparse.Namespace) -> Overrides:
    subject = None
    if args.subject is not None:
        kind, _, name = args.subject.partition(":")
        if kind in ("header", "query") and name:
            subject = Subject(kind, name.lower() if kind == "header" else name)
        else:
            subject = Subject()  # consumer (anything else is refused with the flag, by SubjectRule)
    return Overrides(key_names=tuple(args.key_names or ()), no_key_in_header=args.no_key_in_header,
                     no_key_in_query=args.no_key_in_query, subject=subject)


def wrap_source(source: CredentialSource, args: argparse.Namespace) -> GatewaySource:
    plugins = PluginsFile(args.plugins) if getattr(args, "plugins", None) is not None else None
    return GatewaySource(source, plugins, overrides_from_args(args))


def gateway_from_args(args: argparse.Namespace, credentials: CredentialSync | None) -> Callable[[], dict | None]:
    """What the pipeline pushes into the core: the same object until the configuration changes."""
    overrides = overrides_from_args(args)
    last: list = [object(), None]  # (the configuration it was made from, the dict)

    def current() -> dict | None:
        config = credentials.gateway if credentials is not None else None
        if last[0] is not config:
            last[:] = [config, core_gateway(config, overrides)]
        return last[1]

    return current


def adopt_plugin_delivery(args: argparse.Namespace, credentials: CredentialSync | None,
                          environ: Mapping[str, str] = os.environ) -> None:
    """Without `--ingest-endpoint` or `--output`, the endpoint the entries name becomes the sink
    (`args.ingest_endpoint`); `args.plugin_api_token` is the entries' token for that endpoint, if any.
    Read once, at start: a later change of endpoint needs a restart."""
    args.plugin_api_token = None
    if credentials is not None and not credentials.ready and not args.ingest_endpoint and not args.output:
        log.warning("the gateway's configuration could not be read at start: events go to the local store, even"
                    " if its %s entries name an ingest endpoint (give --ingest-endpoint)", NAME)
        return
    config = credentials.gateway if credentials is not None else None
    endpoint, token = _plugin_delivery(config, environ)
    if endpoint is None:
        return
    if not args.ingest_endpoint and not args.output:
        args.ingest_endpoint = endpoint
        log.info("events go to the ingest endpoint the %s entries name: %s", NAME, shown_url(endpoint))
    if args.ingest_endpoint == endpoint and token is not None:
        args.plugin_api_token = PluginToken(token, environ)


def _plugin_delivery(config: GatewayConfig | None, environ: Mapping[str, str]) -> tuple[str | None, Secret | None]:
    """The one endpoint (and token) the entries name; refused when they name several."""
    named = [(entry, entry.ingest_endpoint) for entry in config.metering if entry.ingest_endpoint] if config else []
    if not named:
        return None, None
    endpoints = {}
    for entry, endpoint in named:
        try:
            endpoints.setdefault(resolve(endpoint, f"{entry.where}: config.ingest_endpoint", environ), entry)
        except TokenError as exc:
            raise GatewayConfigError(str(exc)) from None
    if len(endpoints) > 1:
        first, second = list(endpoints.values())[:2]
        raise GatewayConfigError(f"the {NAME} entries name {len(endpoints)} different ingest endpoints ({first.where}"
                                 f" and {second.where}); the agent sends to one: give --ingest-endpoint")
    (endpoint, _), = endpoints.items()
    tokens = {entry.api_token for entry, _ in named if entry.api_token is not None}
    if len(tokens) > 1:
        raise GatewayConfigError(f"the {NAME} entries give different api_token values for {shown_url(endpoint)};"
                                 " set METERING_API_TOKEN or use --api-token-file")
    return endpoint, next(iter(tokens), None)
