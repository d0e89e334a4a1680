"""What every credential source gives: a whole table plus key-auth's settings and the gateway's configuration,
read in one go, so that they refresh together in one swap."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from agent.credentials.key_auth import KeyAuthConfig
from agent.credentials.table import CredentialTable
from agent.gateway.model import GatewayConfig


@dataclass(frozen=True, slots=True)
class Snapshot:
    table: CredentialTable
    key_auth: KeyAuthConfig | None  # None: the source says nothing about key-auth; use flags or defaults
    skipped: int = 0  # credentials listed but not mappable (no key, unknown consumer, ttl ran out)
    gateway: GatewayConfig | None = None  # services, routes, plugins; None: the source says nothing of them


class CredentialSource(Protocol):
    @property
    def description(self) -> str:
        """Names the source in logs: a file name or the Admin API URL, never a token."""

    def load(self) -> Snapshot:
        """Read the whole source; raises CredentialError with one line saying what is wrong."""

    def fingerprint(self) -> Hashable | None:
        """A cheap "has it changed?" token (a file's stat); None when only a full load can tell."""
