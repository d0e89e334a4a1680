"""Flags of live capture (`--iface`); the live source and runner read them."""

from __future__ import annotations

import argparse

DEFAULT_RING_MB = 256
MAX_WORKERS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live capture (with --iface)")
    group.add_argument("--workers", type=_bounded_int(1, MAX_WORKERS), default=1, metavar="N",
                       help="capture processes sharing the traffic by flow hash (default 1); "
                            "every connection stays in one process")
    group.add_argument("--ring-mb", type=_bounded_int(4, 1 << 20), default=DEFAULT_RING_MB, metavar="MIB",
                       help=f"kernel packet ring of each worker, in MiB (default {DEFAULT_RING_MB}): it holds what "
                            "arrives while the agent is behind, e.g. during the gateway's peaks")
    group.add_argument("--no-yield-cpu", dest="yield_cpu", action="store_false",
                       help="compete with the gateway for CPU as an equal. By default the capture runs at idle "
                            "priority while its ring has room, catching up when the gateway quietens, and takes "
                            "priority over the gateway once the ring is 3/4 full, so that nothing is lost")
    group.add_argument("--user", metavar="NAME",
                       help="after opening the capture, switch to this user (e.g. nobody), keeping no privilege")


def _bounded_int(low: int, high: int):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse
