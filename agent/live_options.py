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
    group.add_argument("--ring-mb", type=_bounded_int(4, 1 << 16), default=DEFAULT_RING_MB, metavar="MIB",
                       help=f"kernel packet ring per worker, in MiB (default {DEFAULT_RING_MB}): "
                            "it absorbs bursts the agent cannot keep pace with")
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
