"""`agent events`: the local store shown the way Konnect's Metering & Billing > Events tab shows ingest.

The latest events (time, subject, method, URI, status) and the count per subject, optionally only one
subject's or only since a moment; `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from agent.flags import FlagParser, whole_number
from agent.sink.datadir import STORE_FILE_NAME, default_data_dir
from agent.sink.store import EventStore, StoredEvent

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds from a look-back (`30s`, `15m`, `2h`, `7d`, `1w`) or an RFC 3339 time / ISO date."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match:
        return (time.time() if now is None else now) - float(match[1]) * DURATION_UNITS[match[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use e.g. 15m, 2h, 7d or 2024-05-01T10:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="agent events", description="Show the events kept in the local store (runs without"
                                                         " --output or --ingest-endpoint write there).")
    parser.add_argument("--data-dir", metavar="DIR", type=Path, help="the agent's data directory")
    parser.add_argument("--store", metavar="PATH", type=Path,
                        help=f"the store file (default DATA_DIR/{STORE_FILE_NAME})")
    parser.add_argument("--subject", help="only this subject's events")
    parser.add_argument("--since", type=parse_since, metavar="WHEN",
                        help="only events from this time on: 15m, 2h, 7d, or an RFC 3339 time")
    parser.add_argument("--limit", type=whole_number(0, 1_000_000), default=20, metavar="N",
                        help="latest events to list (default 20)")
    parser.add_argument("--json", action="store_true", help="one JSON document: counts and the latest events")
    return parser


def events_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    path = args.store or (args.data_dir or default_data_dir()) / STORE_FILE_NAME
    if not path.is_file():
        print(f"agent events: error: no local store at {path} (the agent creates it when run without --output"
              " or --ingest-endpoint)", file=sys.stderr)
        return 1
    try:
        store = EventStore(path)
        try:
            latest = store.latest(args.limit, args.subject, args.since)
            counts = store.count_by_subject(args.subject, args.since)
        finally:
            store.close()
    except sqlite3.Error as exc:
        print(f"agent events: error: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    print(_as_json(latest, counts) if args.json else _as_text(latest, counts))
    return 0


def _as_json(latest: list[StoredEvent], counts: list[tuple[str, int]]) -> str:
    return json.dumps({
        "total": sum(count for _, count in counts),
        "subjects": [{"subject": subject, "count": count} for subject, count in counts],
        "events": [stored.event for stored in latest],
    }, indent=2)


def _as_text(latest: list[StoredEvent], counts: list[tuple[str, int]]) -> str:
    total = sum(count for _, count in counts)
    if not total:
        return "No events."
    rows = [("TIME", "SUBJECT", "METHOD", "URI", "STATUS")] + [
        (e.time or "-", e.subject, e.method or "-", e.uri or "-", "-" if e.status is None else str(e.status))
        for e in latest]
    lines = _table(rows)
    lines += [""] + _table([("SUBJECT", "EVENTS")] + [(subject, str(count)) for subject, count in counts])
    lines += ["", f"{total} events, {len(counts)} subjects; the latest {len(latest)} listed."]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]) for row in rows]
