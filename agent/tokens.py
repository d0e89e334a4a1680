"""API tokens (the ingest endpoint's, the Admin API's RBAC token): from a file or the environment, never
from argv, and never in a log or an error message.

A token is read again each time it is needed after a refusal, so fixing the file (or restarting with a
fixed environment) resumes the work without losing what waited.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class TokenError(ValueError):
    """The token cannot be read or is malformed; the message never contains the token."""


class Fallback(Protocol):
    """Where a token comes from when neither the file nor the variable gives one (the plugin's api_token)."""

    def describe(self) -> str: ...

    def read(self) -> str: ...


class TokenSource:
    def __init__(self, path: Path | None, env_name: str, label: str,
                 environ: Mapping[str, str] | None = None, fallback: Fallback | None = None) -> None:
        self.path = path
        self.env_name = env_name
        self.label = label  # what the token is, for messages: "API token", "admin token"
        self._environ = environ
        self._fallback = fallback

    def describe(self) -> str:
        if self.path:
            return f"{self.label} file {self.path}"
        if self._fallback is not None:
            return f"${self.env_name}, else {self._fallback.describe()}"
        return f"${self.env_name}"

    def read(self) -> str | None:
        """The current token (the file when given, else the environment, else the fallback), or None when
        none is configured."""
        if self.path is not None:
            try:
                raw = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise TokenError(f"{self.label} file {self.path}: cannot read ({reason})") from None
        else:
            raw = (os.environ if self._environ is None else self._environ).get(self.env_name, "")
        token = raw.strip()
        if not token:
            if self.path is not None:
                raise TokenError(f"{self.label} file {self.path} is empty")
            return self._fallback.read() if self._fallback is not None else None
        if not all(0x21 <= ord(ch) <= 0x7E for ch in token):  # what an HTTP header can carry
            raise TokenError(f"the {self.label} from {self.describe()} holds characters a header cannot carry")
        return token


def shown_url(url: str) -> str:
    """A URL as a message may show it: without the user name and password it may carry."""
    scheme, separator, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not separator or "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"
