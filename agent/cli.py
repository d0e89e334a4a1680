"""`agent`: the command line. Parses flags, builds the edges (source, credentials, sink), runs a mode."""

from __future__ import annotations

import argparse
import logging
import sys

from agent import options
from agent._core import CaptureError
from agent.credentials import options as credential_options
from agent.credentials.errors import CredentialError
from agent.flags import FlagParser, not_empty
from agent.gateway import options as gateway_options
from agent.gateway.errors import GatewayConfigError
from agent.live import options as live_options
from agent.metering.subject import SubjectError
from agent.sink import Sink
from agent.sink import options as sink_options
from agent.sink.events_command import events_command

log = logging.getLogger("agent")

USAGE = """%(prog)s (--read FILE | --iface NAME) [--credentials SOURCE] [--port N] [options]
       %(prog)s events [--since WHEN] [--subject NAME] [--json] [options]"""

EPILOG = """\
`agent events --help` shows the events kept in the local store.

exit status of a replay (--read):
  0    every event written (for --ingest-endpoint: acknowledged) from a clean capture
  1    an input that cannot be read (the capture, the credentials), or events left in the spool (the
       endpoint is down or refuses them; --give-up-after passed) or dead-lettered; the next start
       sends what the spool holds
  2    a usage error: a bad flag, an --output that cannot be written
  3    the capture is damaged (cut short, corrupt): every event that could be read was written
  130  stopped by SIGINT (Ctrl-C); 143: stopped by SIGTERM. Either way the summary line and the spool
       line are printed and nothing spooled is lost
live capture (--iface) runs until SIGINT or SIGTERM and then exits 0 (1 if a worker failed)."""


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="agent",
        usage=USAGE,
        description="Passive API metering for Kong Gateway: one usage CloudEvent per billable request.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--read", metavar="FILE", type=not_empty, help="replay a pcap/pcapng capture (optionally .gz)")
    mode.add_argument("--iface", metavar="NAME", type=not_empty,
                      help="capture live from this interface (e.g. lo, eth0)")
    parser.add_argument("--output", metavar="PATH", type=not_empty,
                        help="write events as JSON Lines to PATH ('-': stdout)")
    sink_options.add_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    options.add_arguments(parser)
    live_options.add_arguments(parser)
    credential_options.add_arguments(parser)
    gateway_options.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["events"]:
        return events_command(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    options.check_arguments(parser, args)
    gateway_options.check_arguments(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="agent: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        if args.iface:
            credential_options.refuse_missing_deck_file(args)
        credentials = credential_options.credentials_from_args(args)

        def open_sink() -> Sink:
            """Once the credentials (and with them the plugin's endpoint) are loaded."""
            gateway_options.adopt_plugin_delivery(args, credentials)
            return sink_options.sink_from_args(args)

        if args.iface:
            from agent.live.run import run_live

            if credentials is not None:
                credentials.load_at_start()
            return run_live(args, credentials, open_sink())
        from agent.replay import replay

        return replay(args, credentials, open_sink)
    except (sink_options.SinkConfigError, credential_options.MissingDeckFile, GatewayConfigError) as error:
        print(f"agent: error: {error}", file=sys.stderr)
        return 2
    except (CaptureError, CredentialError, SubjectError, OSError) as error:
        print(f"agent: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
