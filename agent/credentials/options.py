"""Command-line flags for the credential table, and the factory that turns them into a CredentialSync."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from agent.credentials.admin_api import TOKEN_ENV, AdminApiSource
from agent.credentials.deck import DeckFileSource
from agent.credentials.errors import CredentialError
from agent.credentials.source import CredentialSource
from agent.credentials.sync import CredentialSync
from agent.flags import RefusedToken, seconds
from agent.gateway import options as gateway_options

SUBJECT_FIELDS = ("username", "id", "custom_id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("credentials (which consumer an apikey belongs to)")
    group.add_argument(
        "--credentials", metavar="SOURCE",
        help="Kong's Admin API, http[s]://HOST:8001[/WORKSPACE], or a decK state file (YAML or JSON)")
    group.add_argument(
        "--credentials-refresh", metavar="SECONDS", type=seconds(), default=30.0,
        help="how often to re-read the credentials (default 30); a decK file is also re-read when it changes")
    group.add_argument(
        "--admin-token-file", metavar="PATH", type=Path,
        help=f"file holding the RBAC token sent as Kong-Admin-Token (default: ${TOKEN_ENV})")
    group.add_argument("--admin-token", action=RefusedToken, what="Admin API token",
                       advice=f"set ${TOKEN_ENV} or use --admin-token-file PATH")
    group.add_argument(
        "--subject-field", choices=SUBJECT_FIELDS, default="username",
        help="which consumer field becomes the event subject (default username; "
             "a consumer without a username falls back to its id)")


def source_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> CredentialSource | None:
    """None without --credentials; CredentialError (exit-worthy) for a source that cannot be meant."""
    spec = args.credentials
    if not spec:
        return None
    if "://" in spec:
        return AdminApiSource(spec, token_file=args.admin_token_file, environ=environ)
    if args.admin_token_file is not None:
        raise CredentialError("--admin-token-file goes with an Admin API URL, not a decK file")
    return DeckFileSource(Path(spec))


class MissingDeckFile(CredentialError):
    """A usage error, not an outage: live capture would otherwise wait for a table that never comes."""


def refuse_missing_deck_file(args: argparse.Namespace) -> None:
    """Live mode, at start: a decK file that is not there is a mistyped path. The Admin API, and a file that
    disappears later, get the documented patience instead (the last table is kept, loads are retried)."""
    spec = args.credentials
    if spec and "://" not in spec and not os.path.exists(spec):
        raise MissingDeckFile(f"--credentials {spec}: no such file (a decK state file must exist when live"
                              " capture starts)")


def credentials_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> CredentialSync | None:
    """The sync of the source the flags name, its snapshots completed with the gateway's configuration."""
    source = source_from_args(args, environ)
    if source is None:
        return None
    return CredentialSync(gateway_options.wrap_source(source, args), args.credentials_refresh)
