"""Flags of live capture (`--iface`); the live source and runner read them."""

from __future__ import annotations

import argparse

from agent.flags import not_empty, power_of_two, whole_number

DEFAULT_RING_MB = 256
DEFAULT_TLS_RING_MB = 128    # about 4 s of a saturated stand-in's plaintext here (40k req/s, 800 bytes each)
MAX_TLS_RING_MB = 1024
MAX_WORKERS = 64


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations live capture refuses before anything is opened."""
    if getattr(args, "tls_port", None) and not args.iface:
        parser.error("--tls-port goes with live capture (--iface)")
    if getattr(args, "tls_port", None) and args.workers > 1:
        parser.error("--tls-port goes with --workers 1: the TLS probes feed one pipeline")
    if getattr(args, "tls_port", None) and args.user:
        parser.error("--tls-port cannot go with --user: the TLS probes need root for as long as the agent runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live capture (with --iface)")
    group.add_argument("--workers", type=whole_number(1, MAX_WORKERS), default=1, metavar="N",
                       help="capture processes sharing the traffic by flow hash (default 1); "
                            "every connection stays in one process")
    group.add_argument("--ring-mb", type=whole_number(4, 1 << 20), default=DEFAULT_RING_MB, metavar="MIB",
                       help=f"kernel packet ring of each worker, in MiB (default {DEFAULT_RING_MB}): it holds what "
                            "arrives while the agent is behind, e.g. during the gateway's peaks")
    group.add_argument("--no-yield-cpu", dest="yield_cpu", action="store_false",
                       help="compete with the gateway for CPU as an equal. By default the capture runs at idle "
                            "priority while its ring has room, catching up when the gateway quietens, and takes "
                            "priority over the gateway once the ring is 3/4 full, so that nothing is lost")
    group.add_argument("--tls-port", type=whole_number(1, 65535), action="append", metavar="N",
                       help="also meter HTTPS served on this port, repeatable: read from the gateway's own TLS "
                            "library (OpenSSL's SSL_read/SSL_write) by eBPF uprobes, without keys; needs root "
                            "(CAP_BPF, CAP_PERFMON and tracefs) and a kernel with uprobes and BTF")
    group.add_argument("--tls-ring-mb", type=power_of_two(1, MAX_TLS_RING_MB), default=DEFAULT_TLS_RING_MB,
                       metavar="MIB",
                       help=f"the TLS probes' ring buffer, in MiB, a power of two (default {DEFAULT_TLS_RING_MB}): it "
                            "holds the plaintext read and written while the agent is behind; larger responses "
                            "need more")
    group.add_argument("--user", metavar="NAME", type=not_empty,
                       help="after opening the capture, switch to this user (e.g. nobody), keeping no privilege; the "
                            "data directory (spool, store) becomes that user's, the decK file must be readable by it")
