"""The plugin's `api_token` (and decK templates in `ingest_endpoint`), resolved from the agent's environment.

- `{vault://env/NAME}`: Kong's env vault, which reads NAME with `-` made `_` and upper-cased (so
  `{vault://env/metering-token}` is `$METERING_TOKEN`); `?prefix=P` puts P before it; `{vault://env/NAME/KEY}`
  takes KEY from the variable's JSON object. The agent reads its own environment, not Kong's: the
  variable must be set for the agent. Other vaults (aws, hcv, ...) cannot be read by the agent.
- `${{ env "NAME" }}`: decK's template, the variable NAME as it is.
- anything else: the token itself.

Resolved when it is needed, never stored in a message: an error names the variable, never its value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qs

from agent.gateway.model import Secret
from agent.tokens import TokenError

_VAULT = re.compile(r"^\{vault://([^/}?#]+)/([^}?#]*)(?:\?([^}#]*))?(?:#[^}]*)?\}$")
_DECK_ENV = re.compile(r"""^\$\{\{\s*env\s+"([^"]+)"\s*\}\}$""")


def resolve(value: str, what: str, environ: Mapping[str, str] | None = None) -> str:
    """`value` with its reference resolved; TokenError (naming `what` and the variable) when it cannot be."""
    environ = os.environ if environ is None else environ
    text = value.strip()
    deck = _DECK_ENV.match(text)
    if deck:
        return _variable(deck.group(1), what, environ)
    vault = _VAULT.match(text)
    if not vault:
        if text.startswith("{vault://"):
            raise TokenError(f"{what} is not a vault reference the agent can read ({{vault://env/NAME}})")
        return value
    name, resource, query = vault.groups()
    if name != "env":
        raise TokenError(f"{what} refers to the vault {name}, which the agent cannot read; set the token in its"
                         " environment (METERING_API_TOKEN) or use --api-token-file")
    variable, _, key = resource.partition("/")
    prefix = parse_qs(query or "").get("prefix", [""])[-1]
    env_variable = (prefix + variable.replace("-", "_")).upper()
    raw = _variable(env_variable, what, environ)
    if not key:
        return raw
    try:
        found = json.loads(raw).get(key)
    except (ValueError, AttributeError):
        found = None
    if not isinstance(found, str):
        raise TokenError(f"{what} refers to the key {key} of a JSON object in ${env_variable}, which it does"
                         " not have")
    return found


def _variable(name: str, what: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name, "")
    if not value.strip():
        raise TokenError(f"{what} refers to ${name}, which is not set")
    return value


class PluginToken:
    """The plugin's `api_token` as a token source: read at each use, so a fixed variable is picked up."""

    def __init__(self, token: Secret, environ: Mapping[str, str] | None = None) -> None:
        self._token = token
        self._environ = environ

    def describe(self) -> str:
        return "the metering-and-billing plugin's api_token"

    def read(self) -> str:
        token = resolve(self._token.reveal(), self.describe(), self._environ).strip()
        if not token or not all(0x21 <= ord(ch) <= 0x7E for ch in token):  # what an HTTP header can carry
            raise TokenError(f"{self.describe()} is empty or holds characters a header cannot carry")
        return token
