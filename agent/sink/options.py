"""Command-line flags for where events go, and the factory that picks the sink from them.

- `--output PATH|-` (added by the CLI): JSON Lines.
- `--ingest-endpoint URL`: OpenMeter / Konnect ingest through the durable spool. In replay (`--read`) a
  full spool makes the pipeline wait, and the agent exits only once every event is acknowledged (or, with
  `--exit-when-spooled`, once every event is safely on disk). In live capture a full spool refuses new
  events, counted and logged, and shutdown does not wait: the spool is sent at the next start.
- neither: the local SQLite store in the data directory, shown by `agent events`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from agent.flags import RefusedToken, byte_size, seconds, whole_number
from agent.sink import Sink
from agent.sink.datadir import SPOOL_DIR_NAME, STORE_FILE_NAME, default_data_dir, ensure_private_dir
from agent.sink.ingest import (DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_INTERVAL, DEFAULT_SPOOL_MAX_BYTES, IngestSettings,
                               IngestSink, api_token_source)
from agent.sink.jsonl import JsonLinesSink
from agent.sink.spool import MIN_SEGMENT_BYTES, SpoolBusy
from agent.sink.store import StoreSink
from agent.tokens import TokenError, shown_url

MAX_SPOOL_BYTES = 1 << 50  # beyond any disk: a typo, not a size
spool_size = byte_size(MIN_SEGMENT_BYTES, MAX_SPOOL_BYTES)
DEFAULT_GIVE_UP_AFTER = 60.0  # a one-off backfill should end on its own when the endpoint is gone


class SinkConfigError(ValueError):
    """A sink cannot be set up from the flags given; the message is one line for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "event delivery", "Without --output or --ingest-endpoint, events go to the local store (see `agent events`).")
    group.add_argument("--ingest-endpoint", metavar="URL",
                       help="OpenMeter/Konnect ingest URL, e.g. https://us.api.konghq.com/v3/openmeter/events;"
                            " the token comes from $METERING_API_TOKEN or --api-token-file")
    group.add_argument("--api-token-file", metavar="PATH", type=Path,
                       help="file holding the ingest API token (re-read when the endpoint refuses it)")
    group.add_argument("--api-token", action=RefusedToken, what="API token",
                       advice="set $METERING_API_TOKEN or use --api-token-file PATH")
    group.add_argument("--batch-size", metavar="N", type=whole_number(1, 100_000), default=DEFAULT_BATCH_SIZE,
                       help=f"most events per request (default {DEFAULT_BATCH_SIZE})")
    group.add_argument("--flush-interval", metavar="SECONDS", type=seconds(zero_allowed=True),
                       default=DEFAULT_FLUSH_INTERVAL,
                       help=f"send a partial batch once its oldest event waited this long"
                            f" (default {DEFAULT_FLUSH_INTERVAL:g})")
    group.add_argument("--data-dir", metavar="DIR", type=Path,
                       help="state directory (default $AGENT_DATA_DIR, /var/lib/kong-metering-agent as root,"
                            " else ~/.local/share/kong-metering-agent)")
    group.add_argument("--spool-dir", metavar="DIR", type=Path,
                       help=f"where undelivered events are kept (default DATA_DIR/{SPOOL_DIR_NAME})")
    group.add_argument("--spool-max-bytes", metavar="N", type=spool_size, default=DEFAULT_SPOOL_MAX_BYTES,
                       help="bound on the spool's size on disk, e.g. 512M, 4G (default 1G)")
    group.add_argument("--insecure-skip-tls-verify", action="store_true",
                       help="do not verify the ingest endpoint's TLS certificate (testing only)")
    group.add_argument("--ingest-ca-file", metavar="PATH", type=Path,
                       help="CA bundle to verify the ingest endpoint with (a self-hosted OpenMeter)")
    group.add_argument("--exit-when-spooled", action="store_true",
                       help="with --read: exit once every event is safely in the spool, without waiting for"
                            " the endpoint to acknowledge it (the next start sends the rest)")
    group.add_argument("--ack-timeout", metavar="SECONDS", type=seconds(zero_allowed=True),
                       help="with --read: stop waiting for acknowledgements after this long (default: wait)")
    group.add_argument("--give-up-after", metavar="SECONDS", type=seconds(zero_allowed=True),
                       default=DEFAULT_GIVE_UP_AFTER,
                       help="with --read: the ingest endpoint is waited for as long as it acknowledges events;"
                            " after SECONDS of waiting without one acknowledgement, the replay gives up and exits 1,"
                            " the rest kept in the spool for the next start"
                            f" (default {DEFAULT_GIVE_UP_AFTER:g}; 0: wait as long as it takes)")


def sink_from_args(args: argparse.Namespace) -> Sink:
    """JSON Lines with `--output`, the ingest endpoint with `--ingest-endpoint`, else the local store."""
    output = getattr(args, "output", None)
    if output and args.ingest_endpoint:
        raise SinkConfigError("--output and --ingest-endpoint are alternatives: give one")
    if args.api_token_file and not args.ingest_endpoint:
        raise SinkConfigError("--api-token-file needs --ingest-endpoint")
    if output:
        _refuse_overwriting_an_input(output, args)
        return _json_lines_sink(output)
    data_dir = _data_dir(args)
    try:
        if args.ingest_endpoint:
            if args.spool_dir is None:
                ensure_private_dir(data_dir)  # created here, not as a parent of the spool, to be 0700 too
            return _ingest_sink(args, data_dir)
        return StoreSink(data_dir / STORE_FILE_NAME)
    except (OSError, sqlite3.Error) as exc:
        raise SinkConfigError(f"cannot use the data directory {data_dir}: {exc}") from None


def state_dirs(args: argparse.Namespace) -> list[Path]:
    """The directories the sink chosen by `sink_from_args` goes on writing into (`--user` hands them over)."""
    if args.output:
        return []  # a JSON Lines file is written through the descriptor opened at the start
    data_dir = _data_dir(args)
    return [data_dir, _spool_dir(args, data_dir)] if args.ingest_endpoint else [data_dir]


def _data_dir(args: argparse.Namespace) -> Path:
    return args.data_dir or default_data_dir()


def _spool_dir(args: argparse.Namespace, data_dir: Path) -> Path:
    return args.spool_dir or data_dir / SPOOL_DIR_NAME


def _refuse_overwriting_an_input(output: str, args: argparse.Namespace) -> None:
    """`--output` names a file the agent reads (the capture, the decK file): writing would destroy it."""
    if output == "-" or not os.path.exists(output):
        return
    for flag, given in (("--read", getattr(args, "read", None)), ("--credentials", getattr(args, "credentials", None))):
        try:
            if given and os.path.samefile(output, given):
                raise SinkConfigError(f"--output {output} is the {flag} file; it would be overwritten")
        except OSError:  # the input does not exist (yet): nothing to overwrite
            continue


def _json_lines_sink(output: str) -> JsonLinesSink:
    try:
        return JsonLinesSink(output)
    except OSError as exc:
        directory = os.path.dirname(output) or "."
        if isinstance(exc, FileNotFoundError) and not os.path.isdir(directory):
            raise SinkConfigError(f"--output {output}: the directory {directory} does not exist") from None
        raise SinkConfigError(f"--output {output}: cannot write there ({exc.strerror or exc})") from None


def _ingest_sink(args: argparse.Namespace, data_dir: Path) -> IngestSink:
    endpoint = args.ingest_endpoint
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise SinkConfigError(f"--ingest-endpoint {shown_url(endpoint)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SinkConfigError(f"--ingest-endpoint must be an http(s) URL, not {shown_url(endpoint)!r}")
    if parts.username is not None or parts.password is not None:
        raise SinkConfigError("--ingest-endpoint takes no user or password in the URL; the token comes from "
                              "$METERING_API_TOKEN or --api-token-file")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in endpoint):
        raise SinkConfigError("--ingest-endpoint holds a space or a control character")
    if args.insecure_skip_tls_verify and args.ingest_ca_file:
        raise SinkConfigError("--insecure-skip-tls-verify and --ingest-ca-file are alternatives: give one")
    replay = bool(getattr(args, "read", None))
    spool_dir = _spool_dir(args, data_dir)
    settings = IngestSettings(
        endpoint=endpoint,
        spool_dir=spool_dir,
        batch_size=args.batch_size,
        flush_interval=args.flush_interval,
        spool_max_bytes=args.spool_max_bytes,
        block_when_full=replay,
        wait_for_ack=replay and not args.exit_when_spooled,
        ack_timeout=args.ack_timeout,
        give_up_after=args.give_up_after or None,
        verify=tls_verification(args),
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per batch would drown the rest
    try:
        return IngestSink(settings, api_token_source(args.api_token_file, getattr(args, "plugin_api_token", None)))
    except (TokenError, SpoolBusy) as exc:
        raise SinkConfigError(str(exc)) from None
    except OSError as exc:
        raise SinkConfigError(f"cannot open the spool {spool_dir}: {exc.strerror or exc}") from None


def tls_verification(args: argparse.Namespace) -> bool | ssl.SSLContext:
    if args.ingest_ca_file is None:
        return not args.insecure_skip_tls_verify
    try:
        return ssl.create_default_context(cafile=str(args.ingest_ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise SinkConfigError(f"cannot load the CA bundle {args.ingest_ca_file}: {exc}") from None
