"""Flags of live capture (`--iface`); the live source and runner read them."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live capture (with --iface)")
