"""The error the gateway's configuration raises when the agent refuses what it says."""

from agent.credentials.errors import CredentialError


class GatewayConfigError(CredentialError):
    """Routes, services or a metering-and-billing entry the agent refuses (an unknown field, a subject it
    cannot see, a key that would become an attribute, a reference to nothing). One line naming the field
    and where it is, never a value. At start it is a usage error (exit 2); on a later reload it fails that
    load like any credential error, and the last good configuration is kept."""
