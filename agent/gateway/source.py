"""A credential source whose snapshots carry the gateway's configuration made whole and checked.

It wraps the decK file or Admin API source: each load reads that source, then the metering-and-billing
entries (`--plugins FILE` when given: its entries replace the gateway's own, which are then not read at
all; else the gateway's), and checks them against the command line's overrides. Whatever is refused fails
the load, so the credential sync keeps the last good snapshot and says so. A load that finds the same
configuration hands on the same object, so nothing downstream rebuilds for a refresh that changed nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable

from agent.credentials.source import CredentialSource, Snapshot
from agent.gateway.core_config import Overrides, check
from agent.gateway.model import GatewayConfig
from agent.gateway.plugin_config import NAME, read_entry
from agent.gateway.plugins_file import PluginsFile

log = logging.getLogger("agent.credentials")


class GatewaySource:
    def __init__(self, inner: CredentialSource, plugins_file: PluginsFile | None, overrides: Overrides) -> None:
        self.inner = inner
        self.plugins_file = plugins_file
        self.overrides = overrides
        self._last: GatewayConfig | None = None
        self._said_replaced = False

    @property
    def description(self) -> str:
        return self.inner.description

    def fingerprint(self) -> Hashable | None:
        inner = self.inner.fingerprint()
        if self.plugins_file is None:
            return inner
        return (inner, self.plugins_file.fingerprint())

    def load(self) -> Snapshot:
        snapshot = self.inner.load()
        config = snapshot.gateway or GatewayConfig()
        if self.plugins_file is not None:
            entries = self.plugins_file.entries(config.names, self.inner.description)
            if config.plugin_entries and not self._said_replaced:
                log.info("credentials: %d %s entries of %s are not used: --plugins %s replaces them",
                         len(config.plugin_entries), NAME, self.inner.description, self.plugins_file.path)
                self._said_replaced = True
        else:
            entries = config.plugin_entries
        config = dataclasses.replace(config, metering=tuple(read_entry(entry) for entry in entries if entry.enabled),
                                     plugin_configured=bool(entries))
        check(config, self.overrides)
        if config == self._last:
            config = self._last
        self._last = config
        return dataclasses.replace(snapshot, gateway=config)
