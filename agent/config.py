"""`--config FILE` and `AGENT_<FLAG>`: every flag of the command, by its long name, from a YAML file or the
environment, as a service manager or a container sets them. A flag given wins over the environment, which
wins over the file; for flags that exclude each other (`--read`, `--iface`) the one given at the highest
level wins.

The keys are derived from the parser itself, so a flag added to the command is a key at once:

    iface: eth0            # --iface eth0
    port: [8000, 8443]     # --port 8000 --port 8443 (a repeatable flag takes a list)
    no-yield-cpu: true     # --no-yield-cpu (an on/off flag takes true or false)

    AGENT_IFACE=eth0 AGENT_RING_MB=512 AGENT_NO_YIELD_CPU=true AGENT_PORT=8000,8001

Each value goes through the flag's own parsing, so a bad one is refused as on the command line; an
unknown key of the file is refused too (one line, exit 2). The environment is only read for the names of
the flags, so other `AGENT_` variables of the host are left alone. A repeatable flag's variable holds its
values separated by commas or spaces.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from agent.flags import FlagError, FlagParser, RefusedToken, shown_name
from agent.unique_keys import RepeatedKey, StrictLoader

ENV_PREFIX = "AGENT_"
CONFIG_FLAG = "config"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(f"--{CONFIG_FLAG}", metavar="FILE",
                        help="YAML file of flags by their long names (iface: eth0, port: [8000, 8443]); each flag can"
                             " also be set as $AGENT_<FLAG> (AGENT_RING_MB=512). Precedence: flag > environment >"
                             " file")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace("-", "_")


def parse_args(parser: FlagParser, argv: list[str], environ: Mapping[str, str]) -> argparse.Namespace:
    """The command line, completed from the environment and the config file."""
    flags = _flags(parser)
    from_command_line = parser.given(argv)
    from_env = _env_layer(parser, flags, environ)
    path = from_command_line.get(CONFIG_FLAG)
    if path is None and (env_path := environ.get(env_name(CONFIG_FLAG))):
        path = env_path
    from_file = _file_layer(parser, flags, path) if path else {}
    for key, tokens in from_env.items():
        _check(parser, f"${env_name(key)}", tokens)
    for key, tokens in from_file.items():
        _check(parser, f"--config {path}: {key}", tokens)

    groups = _exclusive_groups(parser)
    higher: set[str] = set(from_command_line)
    kept: list[str] = []
    for layer in ({flags[key].dest: tokens for key, tokens in from_env.items()},
                  {flags[key].dest: tokens for key, tokens in from_file.items()}):
        chosen = [tokens for dest, tokens in layer.items() if not (groups.get(dest, {dest}) & higher)]
        higher |= set(layer)
        kept = [token for tokens in chosen for token in tokens] + kept
    return parser.parse_args(kept + argv)


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every flag by its long name, without the dashes (`ring-mb`); not --help, nor hidden ones."""
    flags = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of its actions
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:  # noqa: SLF001
            continue
        long_names = [name for name in action.option_strings if name.startswith("--")]
        if long_names:
            flags[long_names[0][2:]] = action
    return flags


def _exclusive_groups(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """For each flag in a group of alternatives, every member's dest."""
    groups: dict[str, set[str]] = {}
    for group in parser._mutually_exclusive_groups:  # noqa: SLF001
        dests = {action.dest for action in group._group_actions}  # noqa: SLF001
        for dest in dests:
            groups[dest] = dests
    return groups


def _env_layer(parser: FlagParser, flags: dict[str, argparse.Action],
               environ: Mapping[str, str]) -> dict[str, list[str]]:
    """The `AGENT_<FLAG>` variables set, by flag, as command-line tokens."""
    for action in parser._actions:  # noqa: SLF001 - the token flags, refused here as on the command line
        if isinstance(action, RefusedToken) and (name := env_name(action.option_strings[0][2:])) in environ:
            parser.error(f"${name} is not read: {action.advice}")
    layer = {}
    for key, action in flags.items():
        name = env_name(key)
        if name in environ and key != CONFIG_FLAG:
            value: object = environ[name]
            if isinstance(action, argparse._AppendAction):  # noqa: SLF001 - a list, as one variable can hold
                value = [item for item in re.split(r"[\s,]+", environ[name]) if item]
                if not value:
                    parser.error(f"${name}: no value given")
            try:
                layer[key] = _tokens(key, action, value, origin=f"${name}")
            except FlagError as error:
                parser.error(str(error))
    return layer


def _file_layer(parser: FlagParser, flags: dict[str, argparse.Action], path: str) -> dict[str, list[str]]:
    """The file's keys, in its order, as command-line tokens."""
    try:
        document = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=StrictLoader)
    except OSError as error:
        parser.error(f"--config {path}: cannot read it ({error.strerror or error})")
    except UnicodeDecodeError:
        parser.error(f"--config {path}: not UTF-8 text")
    except RepeatedKey as repeated:
        parser.error(f"--config {path}: a key is repeated at line {repeated.line} (first at line "
                     f"{repeated.first_line}); give each flag once (a list for one given many times)")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        parser.error(f"--config {path}: not valid YAML{where}")
    if document is None:
        return {}
    if not isinstance(document, dict):
        parser.error(f"--config {path}: must be a mapping of flag names to values (iface: eth0)")
    layer = {}
    for key, value in document.items():
        action = flags.get(key) if isinstance(key, str) and key != CONFIG_FLAG else None
        if action is None:
            parser.error(f"--config {path}: unknown key {shown_name(key)!r}; the keys are the flags' long names"
                         " (iface, port, ring-mb, ...)")
        try:
            layer[key] = _tokens(key, action, value, origin=key)
        except FlagError as error:
            parser.error(f"--config {path}: {error}")
    return layer


def _tokens(key: str, action: argparse.Action, value: object, origin: str) -> list[str]:
    """The command-line words that say what `value` says: `--key=value`, once per item of a repeatable flag,
    the bare flag for an on/off flag that is on, nothing for one that is off."""
    if action.nargs == 0:
        return [f"--{key}"] if _switch(value, origin) else []
    values = value if isinstance(value, list) and isinstance(action, argparse._AppendAction) else [value]  # noqa: SLF001
    tokens = []
    for item in values:
        if isinstance(item, (dict, list)) or item is None:
            raise FlagError(f"{origin}: takes {'a list of values' if len(values) > 1 else 'one value'}, not {_kind(item)}")
        tokens.append(f"--{key}={str(item).lower() if isinstance(item, bool) else item}")
    return tokens


def _switch(value: object, origin: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise FlagError(f"{origin}: takes true or false")


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", type(None): "an empty value"}.get(type(value), type(value).__name__)


def _check(parser: FlagParser, origin: str, tokens: list[str]) -> None:
    """A value is refused here, naming where it came from, rather than as if typed on the command line."""
    try:
        parser.given(tokens, raising=True)
    except FlagError as error:
        parser.error(f"{origin}: {re.sub(r'^argument [^:]+: ', '', str(error))}")  # the origin names the flag
