"""What the agent writes on stderr: its log, the summary line and its closing errors, as text for a person
or, with `--log-format json`, one JSON object a line for a log shipper (Vector, Fluent Bit, journald's
readers): `time`, `level`, `logger`, `message`, and `fields` where a line has values of its own (the
summary's counters)."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

import orjson

from agent.pipeline import summary_line

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "agent: %(levelname)s: %(message)s"
_json = False


def configure(level: str, log_format: str) -> None:
    global _json
    _json = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if _json else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # httpx logs every request at INFO (five lines per Admin API load): only its warnings are the agent's
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if record.exc_info:
            fields = {**(fields or {}), "exception": self.formatException(record.exc_info)}
        return json_line(record.levelname.lower(), record.getMessage(), fields, record.name, record.created)


def json_line(level: str, message: str, fields: dict | None = None, logger: str = "agent",
              created: float | None = None) -> str:
    when = datetime.fromtimestamp(created, timezone.utc) if created is not None else datetime.now(timezone.utc)
    entry: dict = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": level,
                   "logger": logger, "message": message}
    if fields:
        entry["fields"] = fields
    return orjson.dumps(entry, default=str).decode()


def summary(counters: dict[str, int]) -> None:
    """The closing summary line (whatever the log level: it is the run's result)."""
    if _json:
        print(json_line("info", "summary", counters), file=sys.stderr)
    else:
        print(summary_line(counters), file=sys.stderr)


def error(message: str) -> None:
    """A closing error, one line (`agent: error: ...` as text)."""
    print(json_line("error", message) if _json else f"agent: error: {message}", file=sys.stderr)
