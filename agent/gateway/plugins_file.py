"""`--plugins FILE`: metering-and-billing entries in decK's format, for a gateway that cannot hold them
(Kong OSS refuses a plugin it does not have).

The file holds only metering-and-billing entries, where decK allows plugins: top level (scoped by
`service`, `route`, `consumer`), or nested in `services[]`, `services[].routes[]`, `routes[]`,
`consumers[]`. Those entities are references, by name or id, to the gateway's own (read with the
credentials), not new ones: `services: [{name: example-service, plugins: [...]}]` scopes the entries to
the gateway's `example-service`. The file is watched like a decK credentials file: a change is read once
it has settled.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path

from agent.credentials.errors import CredentialError
from agent.deck_file import DeckShape, plugins, read_document
from agent.gateway.deck import read_plugins
from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import Names, PluginEntry
from agent.gateway.plugin_config import NAME


class PluginsFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fingerprint(self) -> Hashable:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return ("unreadable", exc.errno)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def entries(self, names: Names, among: str) -> tuple[PluginEntry, ...]:
        """The file's entries, scoped by the ids `names` gives (the credential source's, `among`)."""
        label = f"--plugins {self.path}"
        try:
            document = read_document(self.path)
            found = plugins(document)
            for at in found:
                if at.plugin.get("name") != NAME:
                    raise GatewayConfigError(f"{label}: {at.path} is not a {NAME} entry (the file holds only those)")
            _, metering = read_plugins(found, label, among, names)
        except DeckShape as exc:
            raise GatewayConfigError(f"{label}: {exc}") from None
        except GatewayConfigError:
            raise
        except CredentialError as exc:  # the file itself cannot be read: a usage error too
            raise GatewayConfigError(f"--plugins {exc}") from None
        return tuple(metering)
