"""The one error a credential source raises, so callers can tell "no table" from a bug."""


class CredentialError(Exception):
    """A credential source could not be read. The message is one line, names the source and what is
    wrong, and never contains a key (nor a token)."""
