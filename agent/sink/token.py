"""The ingest API token: from a file (`--api-token-file`) or `$METERING_API_TOKEN`, never from argv.

It is read again whenever the endpoint refuses it, so fixing the file (or restarting with a fixed
environment) resumes delivery without losing what waited. Its value never reaches a log or an error.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "METERING_API_TOKEN"


class TokenError(ValueError):
    """The token cannot be read or is malformed; the message never contains the token."""


class TokenSource:
    def __init__(self, path: Path | None = None, env_name: str = TOKEN_ENV) -> None:
        self.path = path
        self.env_name = env_name

    def describe(self) -> str:
        return f"token file {self.path}" if self.path else f"${self.env_name}"

    def read(self) -> str | None:
        """The current token (file first, when given), or None when none is configured."""
        if self.path is not None:
            try:
                raw = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenError(f"cannot read the API token from {self.path}: {type(exc).__name__}") from None
        else:
            raw = os.environ.get(self.env_name, "")
        token = raw.strip()
        if not token:
            if self.path is not None:
                raise TokenError(f"the API token file {self.path} is empty")
            return None
        if not token.isascii() or not token.isprintable() or " " in token:
            raise TokenError(f"the API token from {self.describe()} contains characters a token cannot have")
        return token
