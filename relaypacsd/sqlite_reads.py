"""The reads of the SQLite journal's delivery rows: one file's, one destination's, a folder's paths, the counts.

Only queries: every write of a row is in journal_sqlite, in the transactions that keep rows and history together.
"""

from __future__ import annotations

import os

from relaypacsd.journal import DeliveryRow
from relaypacsd.sqlite_backlog import CHUNK, ROW_COLUMNS
from relaypacsd.sqlite_db import Database, in_lists


class RowReads:
    """The queries over the deliveries table, in a SELECT list that fits the journal's version."""

    def __init__(self, store: Database, *, readonly: bool = False):
        self.store = store
        self._columns = "" if readonly else ROW_COLUMNS  # read-only: looked up at the first query (see columns)

    @property
    def columns(self) -> str:
        """The SELECT list of a DeliveryRow. A command that only looks at a journal no daemon has upgraded yet
        reads its rows without routes (asked at the first query: opening never reads the file)."""
        if not self._columns:
            self._columns = (ROW_COLUMNS if self.store.has_column("deliveries", "route")
                             else ROW_COLUMNS.replace("route", "'' AS route"))
        return self._columns

    def rows(self, path: str) -> dict[str, DeliveryRow]:
        """Every destination's row for one file."""
        found = self.store.query(f"SELECT {self.columns} FROM deliveries WHERE path = ?", (path,))
        return {r[1]: DeliveryRow(*r) for r in found}

    def rows_at(self, dest: str, paths: list[str]) -> dict[str, DeliveryRow]:
        """One destination's rows for several files, in one query per CHUNK (SQLite's parameter limit)."""
        out: dict[str, DeliveryRow] = {}
        for marks, chunk in in_lists(paths, CHUNK):
            found = self.store.query(f"SELECT {self.columns} FROM deliveries WHERE dest = ? AND path IN ({marks})",
                                     [dest, *chunk])
            out.update({r[0]: DeliveryRow(*r) for r in found})
        return out

    def rows_of(self, paths: list[str]) -> dict[str, dict[str, DeliveryRow]]:
        """Every destination's rows for several files, in one query per CHUNK (SQLite's parameter limit)."""
        out: dict[str, dict[str, DeliveryRow]] = {p: {} for p in paths}
        for i in range(0, len(paths), CHUNK):
            chunk = paths[i:i + CHUNK]
            found = self.store.query(f"SELECT {self.columns} FROM deliveries "
                                     f"WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            for r in found:
                out[r[0]][r[1]] = DeliveryRow(*r)
        return out

    def sop_of(self, path: str) -> str:
        """The SOP Instance UID the rows of `path` are about ('' when unknown)."""
        found = self.store.query("SELECT sop FROM deliveries WHERE path = ? AND sop != '' LIMIT 1", (path,))
        return found[0][0] if found else ""

    def paths_under(self, folder: str, after: str = "", limit: int = 0) -> list[str]:
        """File paths with rows beneath `folder`, in order; a page of `limit` (0: all) of those after `after`.

        A range of the primary key (every path below the folder sorts between "folder/" and "folder0"), so a
        page costs its own rows, not a walk of the table."""
        prefix = folder.rstrip(os.sep) + os.sep
        end = prefix[:-1] + chr(ord(os.sep) + 1)
        page = " LIMIT ?" if limit else ""
        return [r[0] for r in self.store.query(f"SELECT DISTINCT path FROM deliveries WHERE path >= ? AND path < ? "
                                               f"AND path > ? ORDER BY path{page}",
                                               (prefix, end, after, *((limit,) if limit else ())))]

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of rows per destination and state."""
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in self.store.query("SELECT dest, state, COUNT(*) FROM deliveries GROUP BY dest, state"):
            out.setdefault(dest, {})[state] = n
        return out

    def route_counts(self) -> dict[str, int]:
        """Files that some destination still owes (pending or waiting), per route name ('' unrouted)."""
        if "''" in self.columns:  # read-only on a journal older than routing: no route recorded anywhere
            return {}
        return dict(self.store.query("SELECT route, COUNT(DISTINCT path) FROM deliveries "
                                     "WHERE state IN ('pending', 'waiting') GROUP BY route"))


class RowReadMethods:
    """The journal's row reads, for a journal class holding a `RowReads` as `_reads`."""

    _reads: RowReads

    def rows(self, path: str) -> dict[str, DeliveryRow]:
        """Every destination's row for one file."""
        return self._reads.rows(path)

    def rows_at(self, dest: str, paths: list[str]) -> dict[str, DeliveryRow]:
        """One destination's rows for several files, in one query."""
        return self._reads.rows_at(dest, paths)

    def rows_of(self, paths: list[str]) -> dict[str, dict[str, DeliveryRow]]:
        """Every destination's rows for several files, in one query."""
        return self._reads.rows_of(paths)

    def sop_of(self, path: str) -> str:
        """The SOP Instance UID the rows of `path` are about ('' when unknown)."""
        return self._reads.sop_of(path)

    def paths_under(self, folder: str, after: str = "", limit: int = 0) -> list[str]:
        """File paths with rows beneath `folder`, in order; a page of `limit` (0: all) of those after `after`."""
        return self._reads.paths_under(folder, after, limit)

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of rows per destination and state."""
        return self._reads.counts()

    def route_counts(self) -> dict[str, int]:
        """Files that some destination still owes (pending or waiting), per route name ('' unrouted)."""
        return self._reads.route_counts()
