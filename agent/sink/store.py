"""The embedded default sink: a SQLite file in the data directory that `agent events` reads.

With neither `--output` nor `--ingest-endpoint`, events land here so that a first run shows something
without any account. Events are keyed on (source, id) and inserted with INSERT OR IGNORE, so replaying a
capture twice counts each request once, as the ingest side would. WAL mode lets `agent events` read
while the agent writes; each `write()` is one transaction, durable against a killed process.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from agent.sink import split_lines
from agent.sink.datadir import ensure_private_dir
from agent.sink.validate import parse_line

log = logging.getLogger("agent.sink.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    time TEXT,
    time_unix REAL,
    subject TEXT NOT NULL,
    method TEXT,
    uri TEXT,
    status INTEGER,
    event TEXT NOT NULL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_time ON events (time_unix);
CREATE INDEX IF NOT EXISTS events_by_subject ON events (subject, time_unix);
"""


def parse_time(value: object) -> float | None:
    """Seconds since the epoch of an RFC 3339 time, so events sort by when they happened."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class StoreSink:
    def __init__(self, path: Path) -> None:
        ensure_private_dir(path.parent)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self.stored = 0
        self.duplicates = 0
        self.invalid = 0

    def write(self, lines: bytes) -> None:
        rows = []
        for line in split_lines(lines):
            event, reason = parse_line(line)
            if reason is None:
                rows.append(_row(event, line))
                continue
            self.invalid += 1
            log.warning("event %r not stored: %s", event.get("id") if isinstance(event, dict) else None, reason)
        if not rows:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                inserted = self._db.executemany(
                    "INSERT OR IGNORE INTO events (source, id, time, time_unix, subject, method, uri, status, event)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows).rowcount
        except sqlite3.Error as exc:  # a damaged or read-only store: the agent cannot go on keeping events
            raise OSError(f"the local store {self.path} cannot take events ({exc})") from None
        self.stored += inserted
        self.duplicates += len(rows) - inserted

    def close(self) -> None:
        self._db.close()

    def counters(self) -> dict[str, int]:
        return {"stored": self.stored, "duplicates": self.duplicates, "invalid": self.invalid}


def _row(event: dict, line: bytes) -> tuple:
    """The columns of a valid event; the event itself is kept as the line it came in (valid UTF-8: parsed)."""
    data = event.get("data") or {}
    status = data.get("response_http_status")
    return (
        event["source"], event["id"], event.get("time"), parse_time(event.get("time")), event["subject"],
        data.get("request_method"), data.get("request_uri"), status if isinstance(status, int) else None,
        line.decode("utf-8"),
    )


@dataclass(frozen=True)
class StoredEvent:
    time: str | None
    subject: str
    method: str | None
    uri: str | None
    status: int | None
    event: dict


class EventStore:
    """Read-only queries behind `agent events`, the way Konnect's Events tab shows them."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        self._db.execute("PRAGMA busy_timeout=5000")

    def _where(self, subject: str | None, since: float | None) -> tuple[str, list]:
        clauses, params = [], []
        if subject is not None:
            clauses.append("subject = ?")
            params.append(subject)
        if since is not None:
            clauses.append("time_unix >= ?")
            params.append(since)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def latest(self, limit: int, subject: str | None = None, since: float | None = None) -> list[StoredEvent]:
        where, params = self._where(subject, since)
        rows = self._db.execute(
            f"SELECT time, subject, method, uri, status, event FROM events{where}"
            " ORDER BY time_unix DESC, id DESC LIMIT ?", [*params, limit])
        return [StoredEvent(t, s, m, u, st, json.loads(e)) for t, s, m, u, st, e in rows]

    def count_by_subject(self, subject: str | None = None, since: float | None = None) -> list[tuple[str, int]]:
        where, params = self._where(subject, since)
        return list(self._db.execute(
            f"SELECT subject, COUNT(*) FROM events{where} GROUP BY subject ORDER BY COUNT(*) DESC, subject", params))

    def close(self) -> None:
        self._db.close()
