"""`agent`: the command line. Parses flags, builds the edges (source, credentials, sink), runs a mode."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from agent import config, logs, options
from agent._core import CaptureError
from agent.credentials import options as credential_options
from agent.credentials.errors import CredentialError
from agent.flags import FlagParser, not_empty
from agent.gateway import options as gateway_options
from agent.gateway.errors import GatewayConfigError
from agent.live import options as live_options
from agent.metering.subject import SubjectError
from agent.observe import server as observe_options
from agent.sink import Sink
from agent.sink import options as sink_options
from agent.sink.events_command import events_command

log = logging.getLogger("agent")

USAGE = """%(prog)s (--read FILE | --iface NAME) [--credentials SOURCE] [--port N] [options]
       %(prog)s events [--since WHEN] [--subject NAME] [--json] [options]
       %(prog)s doctor [the options of a start]"""

EPILOG = """\
`agent events --help` shows the events kept in the local store; `agent doctor` checks what a start needs.

configuration: each flag can also be set by its long name in the --config FILE (YAML: `iface: eth0`,
`port: [8000, 8443]`, `no-yield-cpu: true`) or in the environment as $AGENT_<FLAG> (AGENT_IFACE=eth0,
AGENT_RING_MB=512, AGENT_PORT=8000,8001, AGENT_CONFIG=FILE). Precedence: a flag given > the environment > the file.

exit status of a replay (--read):
  0    every event written (for --ingest-endpoint: acknowledged) from a clean capture
  1    an input that cannot be read (the capture, the credentials), or events left in the spool (the
       endpoint is down or refuses them; --give-up-after passed) or dead-lettered; the next start
       sends what the spool holds
  2    a usage error: a bad flag, an --output that cannot be written
  3    the capture is damaged (cut short, corrupt, or packets cut by a small snap length or that
       cannot be decoded): every event that could be read was written; a warning names each loss
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
    parser.add_argument("--log-format", default="text", choices=logs.LOG_FORMATS,
                        help="json: one object a line (time, level, logger, message, fields), for log shippers")
    options.add_arguments(parser)
    live_options.add_arguments(parser)
    credential_options.add_arguments(parser)
    gateway_options.add_arguments(parser)
    observe_options.add_arguments(parser)
    config.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["events"]:
        return events_command(argv[1:])
    if argv[:1] == ["doctor"]:
        from agent.doctor import doctor

        return doctor(build_parser(), argv[1:])
    parser = build_parser()
    args = config.parse_args(parser, argv, os.environ)
    options.check_arguments(parser, args)
    gateway_options.check_arguments(parser, args)
    live_options.check_arguments(parser, args)
    if args.metrics_listen and args.read:
        parser.error("--metrics-listen goes with live capture (--iface), not --read")
    logs.configure(args.log_level, args.log_format)
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

            return run_live(args, credentials, open_sink)
        from agent.replay import replay

        return replay(args, credentials, open_sink)
    except (sink_options.SinkConfigError, credential_options.MissingDeckFile, GatewayConfigError,
            SubjectError) as error:
        logs.error(str(error))
        return 2
    except (CaptureError, CredentialError, OSError) as error:
        logs.error(str(error))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
