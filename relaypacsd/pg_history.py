"""The delivery history in the PostgreSQL journal: history_sqlite's table, indexes and query in PostgreSQL's
words (one record per instance, destination and outcome; written in the commit that records the answer)."""

from __future__ import annotations

from relaypacsd import history_sqlite
from relaypacsd.history import HistoryQuery, HistoryRecord
from relaypacsd.history_sqlite import COLUMNS, INDEXED, TABLE, _values
from relaypacsd.pg_db import PgDatabase, Statement

_TYPES = {"time": "DOUBLE PRECISION NOT NULL", "status_code": "INTEGER", "bytes": "BIGINT NOT NULL DEFAULT 0",
          "attempt": "INTEGER NOT NULL DEFAULT 0", "duration_ms": "DOUBLE PRECISION"}
_TEXT = "TEXT NOT NULL DEFAULT ''"
SCHEMA = (f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGSERIAL PRIMARY KEY, "
          + ", ".join(f"{c} {_TYPES.get(c, _TEXT)}" for c in COLUMNS) + ");\n"
          + "".join(f"CREATE INDEX IF NOT EXISTS {TABLE}_{name} ON {TABLE}({', '.join(cols)});\n"
                    for name, cols in INDEXED.items()))
INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
PRUNE = f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE time < %s ORDER BY time LIMIT %s)"


class PgHistory:
    """The history's records in the shared database (see history_sqlite.HistoryBook): written, read, pruned."""

    def __init__(self, store: PgDatabase):
        self.store = store

    def statements(self, records: list[HistoryRecord]) -> list[Statement]:
        """The statements that write `records`, for a transaction of the caller's."""
        return [(INSERT, _values(r)) for r in records]

    def record(self, records: list[HistoryRecord]) -> None:
        """Write `records` in one commit of their own."""
        if records:
            self.store.transaction(self.statements(records))

    def find(self, query: HistoryQuery) -> list[HistoryRecord]:
        """The newest records matching `query`, newest first (history_sqlite.select, in PostgreSQL's words)."""
        sql, args = history_sqlite.select(query)
        args = args[:-1] + [query.limit if query.limit > 0 else None]  # LIMIT NULL: every match
        return [HistoryRecord(*row) for row in self.store.query(sql.replace("?", "%s"), args)]

    def prune(self, before: float, limit: int) -> int:
        """Drop up to `limit` of the oldest records older than `before`, in one commit; return how many went."""
        return self.store.change(PRUNE, (before, limit))

