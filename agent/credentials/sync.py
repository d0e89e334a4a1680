"""Keeps the credential table in step with the gateway while the agent runs.

A background thread reloads the source every `refresh_seconds`; a file source is also checked by its
stat every `poll_seconds` (one by default) and reloaded once a change has settled (two checks agree).
Each load builds a whole new table that replaces the old one in a single assignment, so readers never
lock and never see half a table. A failed load keeps the last good table and is retried with capped,
jittered backoff; an outage is logged once when it starts (WARNING) and once when it ends (INFO, with how
many tries failed). A changed table is logged as counts.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from agent.backoff import Backoff
from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import KeyAuthConfig
from agent.credentials.source import CredentialSource, Snapshot
from agent.credentials.table import Consumer, CredentialTable
from agent.gateway.errors import GatewayConfigError
from agent.gateway.model import GatewayConfig

log = logging.getLogger(__name__)

_NEVER_TRIED = object()


class CredentialSync:
    """Owns the current table: `start()` for a running agent, `load_once()` for replaying a capture."""

    def __init__(
        self,
        source: CredentialSource,
        refresh_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if refresh_seconds <= 0:
            raise ValueError("refresh_seconds must be positive")
        self.source = source
        self.refresh_seconds = refresh_seconds
        self._poll_seconds = min(poll_seconds, refresh_seconds)  # how often a file's stat is checked
        self._jitter = jitter
        self._snapshot: Snapshot | None = None
        self._install_lock = threading.Lock()  # one install at a time; readers never take it
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tried_fingerprint: object = _NEVER_TRIED  # the source's fingerprint at the last try
        self._polled_fingerprint: object = _NEVER_TRIED  # ... and at the last check for a change
        self._failures = 0  # consecutive failed tries: non-zero during an outage
        self._outage_started = 0.0
        self.loaded_at: float | None = None  # wall-clock time of the last good load (monitoring: its age)

    @property
    def table(self) -> CredentialTable | None:
        snapshot = self._snapshot
        return snapshot.table if snapshot else None

    @property
    def key_auth(self) -> KeyAuthConfig | None:
        snapshot = self._snapshot
        return snapshot.key_auth if snapshot else None

    @property
    def gateway(self) -> GatewayConfig | None:
        snapshot = self._snapshot
        return snapshot.gateway if snapshot else None

    @property
    def ready(self) -> bool:
        """True once a table has loaded; it stays true through later outages (the last table is kept)."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def lookup(self, key: str) -> Consumer | None:
        """The consumer for a key in the current table; None also before the first table (check `ready`)."""
        snapshot = self._snapshot
        return snapshot.table.lookup(key) if snapshot else None

    def load_once(self) -> Snapshot:
        """Load synchronously, e.g. for replaying a capture; raises CredentialError if the source fails.
        Call it before `start()`, not while the thread runs."""
        fingerprint = self.source.fingerprint()
        snapshot = self.source.load()
        self._tried_fingerprint = fingerprint
        self._install(snapshot)
        return snapshot

    def load_at_start(self) -> None:
        """Live capture's start: one try now, so that a configuration the agent refuses stops the start
        (GatewayConfigError, a usage error) and the plugin's ingest endpoint is known before the sink is
        opened. Any other failure is the outage it would be later: said once, and retried by `start()`."""
        self._tried_fingerprint = self.source.fingerprint()
        try:
            snapshot = self.source.load()
        except GatewayConfigError:
            raise
        except CredentialError as exc:
            self._note_failure(str(exc))
            return
        self._install(snapshot)

    def start(self) -> None:
        """Load in the background (at once if nothing is loaded yet), then keep refreshing."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="credential-sync", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop refreshing; returns at once unless a load is in flight (bounded by the source's timeout).
        True when the refresh thread has ended (it is a daemon, so it never holds up the agent's exit)."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        due = time.monotonic() + (self.refresh_seconds if self._snapshot else 0.0)
        watch_file = self.source.fingerprint() is not None
        while True:
            wait = max(0.0, due - time.monotonic())
            if watch_file:
                wait = min(wait, self._poll_seconds)
            if self._stop.wait(wait):
                return
            if time.monotonic() < due and not (watch_file and self._source_changed()):
                continue
            if self._try_load():
                due = time.monotonic() + self.refresh_seconds
            else:
                due = time.monotonic() + self._backoff()

    def _source_changed(self) -> bool:
        """Changed since the last try, and the same as at the previous check: a file being written in place
        (truncated, then filled) is read once it has settled, not half-way through."""
        current = self.source.fingerprint()
        settled = current == self._polled_fingerprint
        self._polled_fingerprint = current
        return settled and current != self._tried_fingerprint

    def _try_load(self) -> bool:
        self._tried_fingerprint = self.source.fingerprint()
        try:
            snapshot = self.source.load()
        except CredentialError as exc:
            self._note_failure(str(exc))
            return False
        except Exception as exc:  # a bug must not end refreshing; its text might quote data, so name it only
            self._note_failure(f"unexpected {type(exc).__name__} (a bug; please report it)")
            return False
        if self._failures:
            log.info("credentials: %s read again after %d failed tries over %.0f s",
                     self.source.description, self._failures, time.monotonic() - self._outage_started)
            self._failures = 0
        self._install(snapshot)
        return True

    def _note_failure(self, reason: str) -> None:
        self._failures += 1
        if self._failures > 1:
            log.debug("credentials: try %d failed: %s", self._failures, reason)
            return
        self._outage_started = time.monotonic()
        snapshot = self._snapshot
        kept = (f"keeping the last good table ({len(snapshot.table)} keys)" if snapshot
                else "no table yet")
        log.warning("credentials: %s; %s; retrying with backoff", reason, kept)

    def _backoff(self) -> float:
        """Doubling from up to a second, capped at the refresh interval, with jitter so that many agents
        do not retry in step against one Admin API."""
        backoff = Backoff(initial=min(1.0, self.refresh_seconds), cap=self.refresh_seconds)
        return backoff.delay(self._failures, self._jitter)

    def _install(self, snapshot: Snapshot) -> None:
        with self._install_lock:
            previous = self._snapshot
            self._snapshot = snapshot
            self.loaded_at = time.time()
            table_change = describe_change(previous.table if previous else None, snapshot.table)
            skipped = f"; {snapshot.skipped} listed credentials cannot be mapped" if snapshot.skipped else ""
            if table_change:
                log.info("credentials: %s from %s%s", table_change, self.source.description, skipped)
            key_auth_changed = previous is None or previous.key_auth != snapshot.key_auth
            if key_auth_changed:
                settings = (snapshot.key_auth.describe() if snapshot.key_auth
                            else "not given (flags or defaults apply)")
                log.info("credentials: key-auth settings from %s: %s", self.source.description, settings)
            self._ready.set()


def describe_change(old: CredentialTable | None, new: CredentialTable) -> str | None:
    """Counts only, never a key or digest: "loaded ..." for a first table, None when nothing changed."""
    new_consumers = {c.id for c in new.consumers()}
    if old is None:
        return f"loaded {len(new_consumers)} consumers with {len(new)} keys"
    old_map, new_map = old.mapping(), new.mapping()
    added = len(new_map.keys() - old_map.keys())
    removed = len(old_map.keys() - new_map.keys())
    remapped = sum(1 for digest in new_map.keys() & old_map.keys() if new_map[digest] != old_map[digest])
    old_consumers = {c.id for c in old.consumers()}
    if not (added or removed or remapped or new_consumers != old_consumers):
        return None
    return (f"table changed: {len(new_consumers)} consumers (+{len(new_consumers - old_consumers)} "
            f"-{len(old_consumers - new_consumers)}), {len(new)} keys (+{added} -{removed}, "
            f"{remapped} now mapping to another or renamed consumer)")
