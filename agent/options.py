"""The metering options shared by replay and live capture, and the pipeline they configure."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable

from agent import _core
from agent.credentials.key_auth import KeyAuthConfig, bad_key_name
from agent.credentials.sync import CredentialSync
from agent.flags import byte_size, not_empty, seconds, whole_number
from agent.gateway.options import gateway_from_args
from agent.metering.subject import SubjectError, SubjectRule
from agent.pipeline import Pipeline

MIN_MEMORY_PER_WORKER = 16 << 20  # a few heads of the largest size, and a few thousand connections


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metering")
    group.add_argument("--port", type=whole_number(1, 65535), action="append", metavar="N",
                       help="the gateway's proxy port, repeatable (default 8000)")
    group.add_argument("--key-names", metavar="NAME[,NAME]", type=key_name_list,
                       help="key-auth's key_names (default: the gateway's, else apikey)")
    group.add_argument("--no-key-in-header", action="store_true", help="as key-auth's key_in_header=false")
    group.add_argument("--no-key-in-query", action="store_true", help="as key-auth's key_in_query=false")
    group.add_argument("--subject", metavar="consumer|header:NAME|query:NAME",
                       help="Kong's subject.look_up_value_in with subject.field (default: each metering-and-billing"
                            " entry's own, else consumer); given, it replaces every entry's subject")
    group.add_argument("--source", type=not_empty, default=socket.gethostname(),
                       help="the events' CloudEvents source, stable per gateway host (default: the host name)")
    group.add_argument("--response-timeout", type=seconds(), default=60.0, metavar="SECONDS",
                       help="capture time after which a request still unanswered is emitted with status 0")
    group.add_argument("--max-connections", type=whole_number(1, 100_000_000), default=1_000_000, metavar="N",
                       help="connections tracked at once (default 1000000); past it the least recently active"
                            " one is closed out (counted evicted_connections)")
    group.add_argument("--max-memory", type=byte_size(MIN_MEMORY_PER_WORKER, 1 << 40), default=256 << 20,
                       metavar="SIZE",
                       help="bound on what the data plane holds (open connections, held segments, partial heads,"
                            " waiting requests), shared by the --workers, e.g. 256M (default); past it the oldest"
                            " requests waiting for credentials go while they hold more than half of it, else the"
                            " least recently active connections are closed early (counted held_overflow,"
                            " shed_connections)")
    group.add_argument("--idle-timeout", type=seconds(), default=300.0, metavar="SECONDS",
                       help="capture time after which a silent connection is closed out")
    group.add_argument("--max-head-bytes", type=whole_number(1024, 1 << 24), default=65536,
                       help="largest request or response head buffered (default 64 KiB)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the flags must say together: each worker gets its share of `--max-memory`."""
    if args.max_memory // args.workers < MIN_MEMORY_PER_WORKER:
        each = MIN_MEMORY_PER_WORKER >> 20
        parser.error(f"argument --max-memory: {args.workers} workers need at least {args.workers * each}M"
                     f" ({each}M each)")


def key_name_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("no key name given")
    if (reason := bad_key_name(names)) is not None:
        raise argparse.ArgumentTypeError(reason)
    return names


def key_auth_from_args(args: argparse.Namespace, credentials: CredentialSync | None) -> Callable[[], KeyAuthConfig]:
    """Flags win; otherwise what the gateway's key-auth says (Admin API or decK), else key-auth's defaults."""

    def effective(gateway: KeyAuthConfig | None) -> KeyAuthConfig:
        gateway = gateway or KeyAuthConfig()
        names = args.key_names or ()
        return KeyAuthConfig(
            key_names=names or gateway.key_names,
            key_in_header=gateway.key_in_header and not args.no_key_in_header,
            key_in_query=gateway.key_in_query and not args.no_key_in_query,
            key_in_body=gateway.key_in_body,
        )

    last: list = [object(), None]  # (the gateway's config it was made from, the effective config)

    def current() -> KeyAuthConfig:
        gateway = credentials.key_auth if credentials is not None else None
        if last[0] is not gateway:
            last[:] = [gateway, effective(gateway)]
        return last[1]

    return current


def pipeline_from_args(args: argparse.Namespace, credentials: CredentialSync | None, share: int = 0,
                       shares: int = 1) -> Pipeline:
    """The pipeline the flags describe; with `shares` > 1 (replay workers), it takes only the connections
    dealt to `share`."""
    key_auth = key_auth_from_args(args, credentials)
    gateway = credentials.key_auth if credentials is not None else None
    # the gateway's own key names too: `--key-names` changes where the agent looks, not where Kong does
    key_names = key_auth().key_names + (gateway.key_names if gateway is not None else ())
    rule = SubjectRule.parse(args.subject or "consumer", args.subject_field, key_names)
    if rule.look_up_value_in == "consumer" and credentials is None:
        raise SubjectError("--subject consumer needs --credentials (a decK file or the Admin API)")
    core = _core.Pipeline(
        ports=sorted(set(args.port or [8000])), source=args.source, subject=rule.look_up_value_in,
        subject_field=rule.field, max_connections=args.max_connections, idle_timeout=args.idle_timeout,
        response_timeout=args.response_timeout, max_head_bytes=args.max_head_bytes,
        max_memory=args.max_memory // args.workers,  # one budget for the agent: each worker gets its share
        share=share, shares=shares)
    return Pipeline(core, rule, key_auth, lambda: credentials.table if credentials is not None else None,
                    lambda: credentials.key_auth if credentials is not None else None,
                    gateway_from_args(args, credentials))
