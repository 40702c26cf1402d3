"""The backlog in the SQLite journal: valid files in sending/ that the engine does not hold in memory.

Each delivery row keeps what delivery and its records read of its file (FACTS; the SOP Instance UID is `sop`)
and a mark, `backlog`, while the file waits outside the engine's active window. A partial index holds only
the marked rows that are still owed, by destination and next try: a page of the files due at one PACS is one
short index walk, however many wait, and the rows of files in the window (with no mark) never enter it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from relaypacsd.journal import Backlogged, DeliveryRow, FileFacts
from relaypacsd.sqlite_db import Database, in_lists

# Added in place to older journals (their rows have no facts: such a file is validated again when taken in).
FACTS = ("sop_class", "study", "series", "size", "digest", "patient_id", "accession", "modality")  # FileFacts' order
ADDED_COLUMNS = [("deliveries", column, "INTEGER" if column == "size" else "TEXT NOT NULL DEFAULT ''")
                 for column in FACTS] + [
    ("deliveries", "backlog", "INTEGER NOT NULL DEFAULT 0"),  # 1: waits outside the active window
]
SET_FACTS = ", ".join(f"{column} = ?" for column in FACTS)
OWED = "state IN ('pending', 'waiting')"  # fate.SETTLED_STATES are the others
INDEXES = f"""
CREATE INDEX IF NOT EXISTS deliveries_backlog ON deliveries(dest, next_try) WHERE backlog = 1 AND {OWED};
"""
CHUNK = 500  # paths per IN (...) list
# A DeliveryRow's columns, in its order (sqlite_reads' too)
ROW_COLUMNS = "path, dest, state, attempts, next_try, first_seen, last_error, last_code, route"


def values_of(f: FileFacts) -> tuple[Any, ...]:
    """FileFacts in FACTS' order (not dataclasses.astuple: this runs for every file, and astuple copies deeply)."""
    return (f.sop_class, f.study, f.series, f.size, f.digest, f.patient_id, f.accession, f.modality)


def _marks(n: int) -> str:
    return ",".join("?" * n)


class Backlog:
    """The journal's backlog: the marks on delivery rows and the queries over them."""

    def __init__(self, store: Database):
        self.store = store

    def take(self, dest: str, before: float, limit: int) -> list[Backlogged]:
        """Up to `limit` files owed to `dest` and due there by `before`, earliest first, with every row of each;
        unmarked in the same transaction: a file is taken once."""
        if limit <= 0:
            return []
        with self.store.lock:
            db = self.store.db
            db.execute("BEGIN IMMEDIATE")
            try:
                # rowid breaks ties in the order files came: the index holds (dest, next_try, rowid).
                found = db.execute(f"SELECT path FROM deliveries WHERE backlog = 1 AND {OWED} AND dest = ? "
                                   "AND next_try <= ? ORDER BY next_try, rowid LIMIT ?", (dest, before, limit)).fetchall()
                paths = [r[0] for r in found]  # one row per file at one PACS
                taken = [self._read_and_unmark(db, paths[i:i + CHUNK]) for i in range(0, len(paths), CHUNK)]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        by_path = {b.path: b for chunk in taken for b in chunk}
        return [by_path[p] for p in paths if p in by_path]

    @staticmethod
    def _read_and_unmark(db: Any, paths: list[str]) -> list[Backlogged]:
        rows = db.execute(f"SELECT {ROW_COLUMNS}, sop, {', '.join(FACTS)} FROM deliveries "
                          f"WHERE path IN ({_marks(len(paths))})", paths).fetchall()
        db.execute(f"UPDATE deliveries SET backlog = 0 WHERE path IN ({_marks(len(paths))})", paths)
        out: dict[str, Backlogged] = {}
        for r in rows:
            path, sop, values = r[0], r[9], r[10:]
            entry = out.get(path)
            if entry is None:
                facts = FileFacts(*values) if values[3] is not None and sop else None  # size: None in older rows
                entry = out[path] = Backlogged(path, sop, facts, {})
            entry.rows[r[1]] = DeliveryRow(*r[:9])
        return list(out.values())

    def put_back(self, paths: Iterable[str]) -> None:
        """Mark files as waiting in the backlog again."""
        paths = list(paths)
        self.store.transaction([(f"UPDATE deliveries SET backlog = 1 WHERE path IN ({marks})", tuple(chunk))
                                for marks, chunk in in_lists(paths, CHUNK)])

    def marked(self, paths: Iterable[str]) -> set[str]:
        """Those of `paths` in the backlog with a row still owed."""
        paths = list(paths)
        out: set[str] = set()
        for marks, chunk in in_lists(paths, CHUNK):
            out.update(r[0] for r in self.store.query(
                f"SELECT DISTINCT path FROM deliveries WHERE backlog = 1 AND {OWED} AND path IN ({marks})", chunk))
        return out

    def counts(self, dests: Iterable[str]) -> dict[str, int]:
        """Files in the backlog per destination owed them (an index-only count: no row is read)."""
        return {d: self.store.query(f"SELECT COUNT(*) FROM deliveries WHERE backlog = 1 AND {OWED} AND dest = ?",
                                    (d,))[0][0] for d in sorted(set(dests))}

    def under(self, folder: str) -> tuple[int, float | None]:
        """Files in the backlog beneath `folder` (a range of paths) and their earliest first sighting."""
        prefix = folder.rstrip(os.sep) + os.sep
        found = self.store.query(f"SELECT COUNT(DISTINCT path), MIN(first_seen) FROM deliveries WHERE backlog = 1 "
                                 f"AND {OWED} AND path >= ? AND path < ?", (prefix, prefix[:-1] + chr(ord(os.sep) + 1)))
        return (found[0][0], found[0][1]) if found else (0, None)


class BacklogMethods:
    """The journal's backlog methods, for a journal class holding a `Backlog` as `_backlog`."""

    _backlog: Backlog

    def take_backlog(self, dest: str, before: float, limit: int) -> list[Backlogged]:
        """Take up to `limit` files owed to `dest` and due by `before` out of the backlog, earliest first."""
        return self._backlog.take(dest, before, limit)

    def to_backlog(self, paths: Iterable[str]) -> None:
        """Put files back in the backlog."""
        self._backlog.put_back(paths)

    def backlogged(self, paths: Iterable[str]) -> set[str]:
        """Those of `paths` that wait in the backlog, owed to some destination."""
        return self._backlog.marked(paths)

    def backlog_counts(self, dests: Iterable[str]) -> dict[str, int]:
        """Files waiting in the backlog per destination owed them."""
        return self._backlog.counts(dests)

    def backlog_under(self, folder: str) -> tuple[int, float | None]:
        """Files waiting in the backlog beneath `folder` and their earliest first sighting."""
        return self._backlog.under(folder)
