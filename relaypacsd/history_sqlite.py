"""The delivery history in the SQLite journal: its table and indexes, the statements a commit adds, the query
and the pruning step, on the journal's database (`SqliteJournal` holds one `HistoryBook`)."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

from relaypacsd.history import HistoryQuery, HistoryRecord
from relaypacsd.sqlite_db import Database, Statement

TABLE = "delivery_history"  # not `history`: that one holds the sidecar's lines of files still in sending/
# The record's fields in order, as columns (`user` is a keyword elsewhere: the column is `operator`).
FIELDS = [f.name for f in dataclasses.fields(HistoryRecord)]
COLUMNS = ["operator" if name == "user" else name for name in FIELDS]
_TYPES = {"time": "REAL NOT NULL", "status_code": "INTEGER", "bytes": "INTEGER NOT NULL DEFAULT 0",
          "attempt": "INTEGER NOT NULL DEFAULT 0", "duration_ms": "REAL"}
_TEXT = "TEXT NOT NULL DEFAULT ''"

# Every lookup `relaypacsd history` offers by an identifier has its index, the time second: the newest
# records of a study are the index's last entries. `time` alone serves --since/--until, --pacs and the newest 50
# (scanned backwards), and the pruning. A rare outcome (failed, conflict) has its own: scanning a million
# delivered records backwards for it took 130-220 ms (the dashboard's failed-at-this-PACS search).
INDEXED = {"time": ("time",), "study": ("study_instance_uid", "time"), "patient": ("patient_id", "time"),
           "accession": ("accession_number", "time"), "sop": ("sop_instance_uid", "time"), "file": ("file", "time"),
           "outcome": ("outcome", "time")}
SCHEMA = (f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, "
          + ", ".join(f"{c} {_TYPES.get(c, _TEXT)}" for c in COLUMNS) + ");\n"
          + "".join(f"CREATE INDEX IF NOT EXISTS {TABLE}_{name} ON {TABLE}({', '.join(cols)});\n"
                    for name, cols in INDEXED.items()))

INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_values = operator.attrgetter(*FIELDS)
# HistoryQuery's filters: field -> column compared for equality
_FILTERS = {"study": "study_instance_uid", "patient": "patient_id", "accession": "accession_number",
            "sop": "sop_instance_uid", "file": "file", "pacs": "destination", "outcome": "outcome"}


PRUNE = f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE time < ? ORDER BY time LIMIT ?)"


class HistoryBook:
    """The history's records in the journal's database: written in the caller's commits, read, pruned."""

    def __init__(self, store: Database):
        self.store = store
        self._exists = False  # known to exist: a read-only journal may be older than the history

    def statements(self, records: list[HistoryRecord]) -> list[Statement]:
        """The statements that write `records`, for a transaction of the caller's."""
        return [(INSERT, _values(r)) for r in records]

    def record(self, records: list[HistoryRecord]) -> None:
        """Write `records` in one commit of their own."""
        if records:
            self.store.transaction(self.statements(records))

    def find(self, query: HistoryQuery) -> list[HistoryRecord]:
        """The newest records matching `query`, newest first; none from a journal without the history yet."""
        if not self._exists:
            self._exists = bool(self.store.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                                 (TABLE,)))
            if not self._exists:
                return []
        sql, args = select(query)
        return [HistoryRecord(*row) for row in self.store.query(sql, args)]

    def prune(self, before: float, limit: int) -> int:
        """Drop up to `limit` of the oldest records older than `before`, in one commit; return how many went."""
        return self.store.change(PRUNE, (before, limit))


class HistoryMethods:
    """The journal's history methods, for a journal class holding a `HistoryBook` as `_history`."""

    _history: HistoryBook

    def record_history(self, records: list[HistoryRecord]) -> None:
        """Add records to the delivery history in one commit (a refusal, a requeue: no row records them)."""
        self._history.record(records)

    def find_history(self, query: HistoryQuery) -> list[HistoryRecord]:
        """The newest history records matching `query`, newest first."""
        return self._history.find(query)

    def prune_history(self, before: float, limit: int) -> int:
        """Drop up to `limit` of the oldest history records older than `before`; return how many went."""
        return self._history.prune(before, limit)


def select(query: HistoryQuery) -> tuple[str, list[Any]]:
    """The SELECT for `query`: every filter given must match; newest first, at most `query.limit` records."""
    where: list[str] = []
    args: list[Any] = []
    for name, column in _FILTERS.items():
        value = getattr(query, name)
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if query.since is not None:
        where.append("time >= ?")
        args.append(query.since)
    if query.until is not None:
        where.append("time <= ?")
        args.append(query.until)
    sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    # id breaks ties of one commit's records (one batch's answer shares its time), and keeps their order.
    sql += " ORDER BY time DESC, id DESC LIMIT ?"
    args.append(query.limit if query.limit > 0 else -1)  # SQLite: a negative LIMIT is none
    return sql, args
