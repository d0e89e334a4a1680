"""The lookup tables the data plane depends on, as monitoring sees them: how many entries, and when the last
good load was. Each becomes one labelled series of `agent_table_entries{table=NAME}` and
`agent_table_age_seconds{table=NAME}`, and readiness waits until every one has loaded once.

A new table joins by one more entry in `table_statuses`. The routes and services come with the credentials,
from the same source (a decK file, the Admin API), so they share its last good load.
"""

from __future__ import annotations

from typing import TypedDict

from agent.credentials.sync import CredentialSync


class TableStatus(TypedDict):
    entries: int
    loaded_at: float | None  # wall-clock time of the last good load; None until the first


def table_statuses(credentials: CredentialSync | None) -> dict[str, TableStatus]:
    """Every table this run uses, by name (none without `--credentials`)."""
    statuses: dict[str, TableStatus] = {}
    if credentials is not None:
        table = credentials.table
        statuses["credentials"] = {"entries": len(table) if table is not None else 0,
                                   "loaded_at": credentials.loaded_at}
        gateway = credentials.gateway  # loaded with the credentials, when the source has them
        if gateway is not None:
            statuses["routes"] = {"entries": len(gateway.routes), "loaded_at": credentials.loaded_at}
            statuses["services"] = {"entries": len(gateway.services), "loaded_at": credentials.loaded_at}
    return statuses
