"""What the commands' flags share: a bad flag is one clear line on stderr (not the whole usage), and a
number out of range is refused there, not met later as a traceback (`--max-connections 0`) or as a run
that quietly makes no sense (`--idle-timeout nan`)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NoReturn


class FlagError(ValueError):
    """A flag's value is refused (raised by `FlagParser.given(..., raising=True)`)."""


class FlagParser(argparse.ArgumentParser):
    _raising = False

    def error(self, message: str) -> NoReturn:
        if self._raising:
            raise FlagError(message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def given(self, argv: list[str], *, raising: bool = False) -> dict[str, object]:
        """What `argv` sets, by dest, parsed and checked as usual but without defaults, and without asking for
        what the rest of the command line may still give (a required mode): the config file and the
        environment complete it. With `raising`, a refused value raises FlagError instead of exiting."""
        unset = object()
        repeatable = {action.dest for action in self._actions if isinstance(action, argparse._AppendAction)}
        namespace = argparse.Namespace(**{action.dest: None if action.dest in repeatable else unset
                                          for action in self._actions if action.dest != argparse.SUPPRESS})
        required = [group for group in self._mutually_exclusive_groups if group.required]
        for group in required:
            group.required = False
        self._raising = raising
        try:
            self.parse_args(argv, namespace)
        finally:
            self._raising = False
            for group in required:
                group.required = True
        return {dest: value for dest, value in vars(namespace).items()
                if value is not unset and not (dest in repeatable and value is None)}


class RefusedToken(argparse.Action):
    """A token flag that exists only to be refused: a token in argv shows in `ps` and shell history, and
    without it argparse would take `--api-token X` as an abbreviation of `--api-token-file X` (and print X in
    the error about the file). `advice` says where the token goes instead."""

    def __init__(self, option_strings: list[str], dest: str, what: str, advice: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]
        self.what = what
        self.advice = advice

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:  # type: ignore[override]
        parser.error(f"the {self.what} is not taken on the command line (it would show in ps); {self.advice}")


def whole_number(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def power_of_two(low: int, high: int) -> Callable[[str], int]:
    """A whole number in range that is a power of two (what the kernel takes as a BPF ring buffer's size)."""
    in_range = whole_number(low, high)

    def parse(text: str) -> int:
        value = in_range(text)
        if value & (value - 1):
            raise argparse.ArgumentTypeError(f"{value} is not a power of two")
        return value

    return parse


def not_empty(text: str) -> str:
    """For names and paths: an empty one would quietly mean "not given" (`--iface ''` fell back to replay)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def seconds(*, zero_allowed: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
            raise argparse.ArgumentTypeError("must be a number of seconds, at least 0" if zero_allowed
                                             else "must be a positive number of seconds")
        return value

    return parse


UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(low: int, high: int) -> Callable[[str], int]:
    """`1073741824`, `512M`, `2G`, `2GiB` (binary units), between `low` and `high`."""

    def parse(text: str) -> int:
        match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
        if not match:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1073741824, 512M, 2G)")
        size = int(match[1]) * UNITS[match[2].lower()]
        if size > high:
            raise argparse.ArgumentTypeError(f"at most {_shown(high)}")
        if size < low:
            raise argparse.ArgumentTypeError(f"at least {_shown(low)}")
        return size

    return parse


def _shown(size: int) -> str:
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def shown_name(name: object) -> str:
    """A field or key name as a message may show it: a name is not a value, but a mangled file may put anything
    where a name goes (a pasted token), so only one shaped like a setting's name is shown: short, words
    and underscores, hardly any digits."""
    text = str(name)
    shaped = re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,47}", text) and sum(ch.isdigit() for ch in text) <= 2
    return text if shaped else "(a field not shown: it does not look like a name)"
