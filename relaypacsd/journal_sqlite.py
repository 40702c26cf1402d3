"""The journal in SQLite (WAL): one file in the state directory, read while the daemon writes.

`Journal` (relaypacsd.journal) is the contract; `tests/test_journal_contract.py` checks it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

from relaypacsd import history_sqlite, nodes_book, sqlite_backlog, sqlite_destinations, sqlite_instances
from relaypacsd.history_sqlite import HistoryBook, HistoryMethods
from relaypacsd.journal import (CONFLICT_EVENT, INSTANCE_MEMORY_DAYS, DeliveryRow, DestinationStats, Ensure,
                                FileFacts, KnownInstance, Update)
from relaypacsd.nodes_book import NodeBook, NodeMethods
from relaypacsd.sqlite_backlog import Backlog, BacklogMethods
from relaypacsd.sqlite_db import Database, Run, Statement, in_lists
from relaypacsd.sqlite_destinations import DestinationBook
from relaypacsd.sqlite_instances import InstanceMemory
from relaypacsd.sqlite_reads import RowReadMethods, RowReads
from relaypacsd.timefmt import iso_time

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    path TEXT NOT NULL,
    dest TEXT NOT NULL,
    sop TEXT NOT NULL DEFAULT '',   -- the instance the row is about: a reused file name is another file
    state TEXT NOT NULL,            -- pending | delivered | waiting | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    last_code INTEGER,
    updated REAL NOT NULL,
    PRIMARY KEY (path, dest)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    dest TEXT NOT NULL,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS history_path ON history(path);
"""

# Columns added after the first release: (table, column, definition). Added in place to older journals.
ADDED_COLUMNS = [
    ("destinations", "conflicts", "INTEGER NOT NULL DEFAULT 0"),
    # A `relaypacsd retry` marks the rows it copies ahead of a file, so it can take back exactly those.
    ("deliveries", "token", "TEXT NOT NULL DEFAULT ''"),
    ("history", "token", "TEXT NOT NULL DEFAULT ''"),
    # The routes that gave a file this destination ([[route]] names, comma-joined): a restart keeps them.
    ("deliveries", "route", "TEXT NOT NULL DEFAULT ''"),
] + sqlite_backlog.ADDED_COLUMNS


class SqliteJournal(HistoryMethods, NodeMethods, BacklogMethods, RowReadMethods):
    """Thread-safe access to the journal database in the state directory: the writes of the delivery rows
    and their history here; the rows' reads, the lasting instance memory, the destinations' health and
    counters, and the nodes and file ownership (one node here: relaypacsd.nodes_spool refuses a second) in
    parts of their own."""

    def __init__(self, path: Path, instance_days: float = INSTANCE_MEMORY_DAYS, *, readonly: bool = False):
        self.path = path
        self.instance_days = instance_days
        self._store = Database(path, SCHEMA + sqlite_instances.SCHEMA + sqlite_destinations.SCHEMA
                               + history_sqlite.SCHEMA + nodes_book.SQLITE.schema(), ADDED_COLUMNS, readonly=readonly,
                               indexes=sqlite_backlog.INDEXES)
        self._lock = self._store.lock
        self._instances = InstanceMemory(self._store, instance_days)
        self._destinations = DestinationBook(self._store)
        self._history = HistoryBook(self._store)
        self._backlog = Backlog(self._store)
        self._reads = RowReads(self._store, readonly=readonly)
        self._nodes = NodeBook(self._store, nodes_book.SQLITE, time.time, shared=False)

    @property
    def _db(self) -> Any:
        return self._store.db

    def close(self) -> None:
        """Close the database."""
        self._store.close()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self._store.query(sql, args)

    def _tx(self, statements: list[Statement]) -> None:
        self._store.transaction(statements)

    def ensure(self, path: str, dests: Iterable[str], first_seen: float | None = None,
               sop: str = "", route: str = "", keep: bool = False, facts: FileFacts | None = None,
               backlog: bool = False) -> dict[str, DeliveryRow]:
        """Create pending rows (carrying `route`) for the destinations a file has none for; return all rows.
        With `keep` (routing), a file that has rows keeps exactly those: none are added, so a reload's new
        routes never change where a file in sending/ goes. With `facts`, every row of the file keeps them and
        the backlog mark (`backlog`), in the statement that takes over a retry's copy.

        Rows left under the same path by another instance (a modality reusing IMG0001.dcm) are dropped
        first: they must never make a new file look delivered."""
        return self.ensure_many([Ensure(path, tuple(dests), first_seen, sop, route, keep, facts, backlog)])[0]

    def ensure_many(self, files: list[Ensure]) -> list[dict[str, DeliveryRow]]:
        """`ensure` for several files in one transaction; each file's rows, in order.

        One look at which of them have rows, in the same write transaction: a file with none (a new file, the
        common case) is one insert per destination, its facts in it, and its rows are what was inserted."""
        now = time.time()
        paths = [f.path for f in files]

        def write(run: Run) -> set[str]:
            known: set[str] = set()
            for marks, chunk in in_lists(paths, sqlite_backlog.CHUNK):
                known.update(r[0] for r in run(f"SELECT DISTINCT path FROM deliveries WHERE path IN ({marks})", chunk))
            looked_up = set(known)  # these are read back after the commit
            for f in files:
                if f.path in known or f.facts is None:
                    stmts = self._ensure_statements(f, now)
                    looked_up.add(f.path)
                else:
                    stmts = self._insert_statements(f, now)
                known.add(f.path)  # a path twice in `files`: the second is ensured as one with rows
                for sql, args in stmts + self._nodes.own_statements(f.path):
                    run(sql, args)
            return looked_up

        looked_up = self._store.write(write)
        rows = self.rows_of([p for p in paths if p in looked_up]) if looked_up else {}
        return [rows[f.path] if f.path in looked_up else
                {d: DeliveryRow(f.path, d, "pending", 0, 0.0, f.first_seen or now, "", None, f.route) for d in f.dests}
                for f in files]

    @staticmethod
    def _insert_statements(f: Ensure, now: float) -> list[Statement]:
        """A file without rows: its pending row at each destination, with its facts and backlog mark (what
        `_ensure_statements` writes for it in four statements)."""
        assert f.facts is not None
        columns = "path, dest, sop, state, first_seen, updated, route, " + ", ".join(sqlite_backlog.FACTS) + ", backlog"
        marks = ", ".join("?" * (8 + len(sqlite_backlog.FACTS)))
        facts = sqlite_backlog.values_of(f.facts)
        return [(f"INSERT INTO deliveries ({columns}) VALUES ({marks})",
                 (f.path, d, f.sop, "pending", f.first_seen or now, now, f.route, *facts, int(f.backlog)))
                for d in dict.fromkeys(f.dests)]

    @staticmethod
    def _ensure_statements(f: Ensure, now: float) -> list[Statement]:
        path, sop, dests, route, seen = f.path, f.sop, f.dests, f.route, f.first_seen or now
        stmts: list[Statement] = []
        if sop:
            stale = "SELECT 1 FROM deliveries WHERE path = ? AND sop != '' AND sop != ?"
            stmts += [(f"DELETE FROM history WHERE path = ? AND EXISTS ({stale})", (path, path, sop)),
                      ("DELETE FROM deliveries WHERE path = ? AND sop != '' AND sop != ?", (path, sop))]
        if f.keep and dests:
            # One statement: its look at the file's rows is taken once, before any of them is written.
            values = ", ".join("(?)" for _ in dests)
            stmts.append((f"INSERT OR IGNORE INTO deliveries (path, dest, sop, state, first_seen, updated, route) "
                          f"SELECT ?, column1, ?, 'pending', ?, ?, ? FROM (VALUES {values}) "
                          "WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE path = ?)",
                          (path, sop, seen, now, route, *dests, path)))
        elif dests:
            stmts += [("INSERT OR IGNORE INTO deliveries (path, dest, sop, state, first_seen, updated, route) "
                       "VALUES (?, ?, ?, 'pending', ?, ?, ?)", (path, d, sop, seen, now, route)) for d in dests]
        # Rows a retry copied here are now this file's: the retry must no longer take them back (uncopy).
        if f.facts is None:
            stmts.append(("UPDATE deliveries SET token = '' WHERE path = ? AND token != ''", (path,)))
        else:  # the same one statement: every row of the file (at any PACS) holds its facts and one mark
            stmts.append((f"UPDATE deliveries SET token = '', {sqlite_backlog.SET_FACTS}, backlog = ? WHERE path = ?",
                          (*sqlite_backlog.values_of(f.facts), int(f.backlog), path)))
        return stmts

    def update(self, path: str, dest: str, *, state: str, event: str, detail: str = "",
               attempts: int | None = None, next_try: float = 0.0, code: int | None = None) -> None:
        """Record a new state for one file at one destination, with a history line."""
        self.apply([Update(path, dest, state, event, detail, attempts, next_try, code)])

    def apply(self, updates: list["Update"]) -> None:
        """Record several new states in one transaction (one batch's answer is one commit)."""
        now = time.time()
        stmts: list[Statement] = []  # the rows' updates; then, statement by statement, the rest: one call each
        lines: list[Statement] = []
        memory: list[Statement] = []
        delivered: dict[str, int] = {}
        failed: dict[str, int] = {}
        for u in updates:
            sets = "state = ?, next_try = ?, updated = ?, last_error = ?, last_code = ?"
            args: list[Any] = [u.state, u.next_try, now, u.detail if u.state != "delivered" else "", u.code]
            if u.attempts is not None:
                sets += ", attempts = ?"
                args.append(u.attempts)
            stmts.append((f"UPDATE deliveries SET {sets} WHERE path = ? AND dest = ?", tuple(args + [u.path, u.dest])))
            lines.append(("INSERT INTO history (path, dest, time, event, detail) VALUES (?, ?, ?, ?, ?)",
                          (u.path, u.dest, now, u.event, u.detail)))
            if u.state == "delivered":
                delivered[u.dest] = delivered.get(u.dest, 0) + 1
            elif u.state == "failed":
                failed[u.dest] = failed.get(u.dest, 0) + 1
            memory += self._instances.statements(u, now)
        stmts += lines + memory + self._destinations.count_statements(delivered, failed, now)
        stmts += self._history.statements([u.record for u in updates if u.record is not None])
        if stmts:
            self._store.transaction(stmts, self._nodes.guard())  # a node taken over writes nothing: LeaseLost

    def remember(self, updates: list[Update]) -> None:
        """Only the lasting memory's part of 'delivered' updates (and their history records): what a PACS confirmed
        of a file dropped meanwhile (it changed); its rows are another version's now and must not move."""
        self._instances.remember(updates, self._history.statements([u.record for u in updates if u.record]))

    def known_instances(self, dest: str, sops: Iterable[str]) -> dict[str, KnownInstance]:
        """What `dest` confirmed earlier under these SOP Instance UIDs (the lasting memory), in one query."""
        return self._instances.known(dest, sops)

    def prune_instances(self, limit: int = sqlite_instances.PRUNE_STEP) -> int:
        """Drop up to `limit` remembered instances older than `instance_days`; return how many went."""
        return self._instances.prune(limit)

    def restore(self, path: str, sop: str, first_seen: float, updates: list[Update], route: str = "") -> None:
        """Write back rows that went missing under a file the engine settled (from its memory), with a history
        line, so its sidecar and a later `relaypacsd retry` know what each PACS said. No counter moves."""
        now = time.time()
        stmts: list[Statement] = []
        for u in updates:
            stmts += [("INSERT OR REPLACE INTO deliveries (path, dest, sop, state, attempts, next_try, first_seen, "
                       "last_error, last_code, updated, route) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
                       (path, u.dest, sop, u.state, u.attempts or 0, first_seen,
                        u.detail if u.state != "delivered" else "", u.code, now, route)),
                      ("INSERT INTO history (path, dest, time, event, detail) VALUES (?, ?, ?, ?, ?)",
                       (path, u.dest, now, u.event, f"(restored from the daemon's memory) {u.detail}"))]
        if stmts:
            self._tx(stmts)

    def history(self, path: str) -> list[dict[str, Any]]:
        """The history of one file, oldest first, for its sidecar."""
        found = self._exec("SELECT time, dest, event, detail FROM history WHERE path = ? ORDER BY id", (path,))
        return [{"time": iso_time(t), "pacs": d, "event": e, "detail": x} for t, d, e, x in found]

    def rename(self, old: str, new: str) -> None:
        """Follow a file that moved (sending/ -> failed/ and back); rows of a file once at `new` go."""
        self._tx([("DELETE FROM deliveries WHERE path = ?", (new,)), ("DELETE FROM history WHERE path = ?", (new,)),
                  # Out of the backlog: a file in failed/ is never taken in, even once a retry resets its rows.
                  ("UPDATE deliveries SET path = ?, backlog = 0 WHERE path = ?", (new, old)),
                  ("UPDATE history SET path = ? WHERE path = ?", (new, old))] + self._nodes.release_statements([old, new]))

    def copy(self, old: str, new: str, token: str) -> bool:
        """Give `new` the rows and history of `old` as well (a file about to move there), marked with `token`;
        `old` keeps its own until the file has landed. Only when `new` holds no rows: one look-and-write
        transaction, so rows a daemon writes there meanwhile (a file it claimed) are never replaced.
        Returns False, copying nothing, when `new` is taken."""
        # Not the backlog mark: a retried file is validated again, and its submission places it.
        cols = ("dest, sop, state, attempts, next_try, first_seen, last_error, last_code, updated, route, "
                + ", ".join(sqlite_backlog.FACTS))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the look and the write under one write lock
            try:
                if self._db.execute("SELECT 1 FROM deliveries WHERE path = ? LIMIT 1", (new,)).fetchall():
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("DELETE FROM history WHERE path = ?", (new,))  # of a file once there, now gone
                self._db.execute(f"INSERT INTO deliveries (path, token, {cols}) SELECT ?, ?, {cols} FROM deliveries "
                                 "WHERE path = ?", (new, token, old))
                self._db.execute("INSERT INTO history (path, token, dest, time, event, detail) SELECT ?, ?, dest, time, "
                                 "event, detail FROM history WHERE path = ? ORDER BY id", (new, token, old))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def uncopy(self, new: str, token: str) -> None:
        """Take back what copy(old, new, token) wrote, and only that: rows a daemon has adopted or written under
        `new` since (a file it claimed there) stay."""
        self._tx([("DELETE FROM deliveries WHERE path = ? AND token = ?", (new, token)),
                  ("DELETE FROM history WHERE path = ? AND token = ?", (new, token))])

    def forget(self, *paths: str) -> None:
        """Drop files that reached sent/, in one transaction: their memory is no longer needed."""
        stmts: list[Statement] = []
        for marks, chunk in in_lists(paths, sqlite_backlog.CHUNK):  # one statement per table for a finished group
            stmts += [(f"DELETE FROM deliveries WHERE path IN ({marks})", chunk),
                      (f"DELETE FROM history WHERE path IN ({marks})", chunk)]
        if stmts:
            self._tx(stmts + self._nodes.release_statements(paths))

    def reset_failed(self, path: str, reason: str = "operator retry") -> list[str]:
        """Operator retry: 'failed' rows go back to 'pending' with fresh attempts and age; 'delivered'
        rows stay, so a PACS that confirmed the file never gets it again. A PACS where the file had a UID
        conflict forgets the other version. Returns the reset destinations."""
        now = time.time()
        found = self._exec("SELECT dest, sop FROM deliveries WHERE path = ? AND state = 'failed'", (path,))
        dests = [r[0] for r in found]
        # A UID conflict is retried on the operator's word: forget the other version that PACS confirmed, or
        # the file would only conflict again.
        conflicted = self.conflicted(path)
        stmts = self._instances.forget_statements((dest, sop) for dest, sop in found if dest in conflicted)
        stmts += [
            ("UPDATE deliveries SET state = 'pending', attempts = 0, next_try = 0, last_error = '', last_code = NULL, "
             "updated = ? WHERE path = ? AND state = 'failed'", (now, path)),
            ("UPDATE deliveries SET first_seen = ? WHERE path = ?", (now, path))]
        stmts += [("INSERT INTO history (path, dest, time, event, detail) VALUES (?, ?, ?, ?, ?)",
                   (path, d, now, "retry", reason)) for d in dests]
        self._tx(stmts)
        return dests

    def conflicted(self, path: str) -> set[str]:
        """The destinations whose last word on this file was a UID conflict."""
        found = self._exec("SELECT dest, event FROM history WHERE path = ? ORDER BY id", (path,))
        last = {dest: event for dest, event in found}
        return {dest for dest, event in last.items() if event == CONFLICT_EVENT}

    def begin_run(self, dests: Iterable[str]) -> None:
        """A daemon (re)starts: every destination's health is unknown until this run finds out."""
        self._destinations.begin_run(dests)

    def set_health(self, dest: str, healthy: bool, error: str = "") -> None:
        """Remember a destination's health for `relaypacsd status`."""
        self._destinations.set_health(dest, healthy, error)

    def destinations(self) -> dict[str, DestinationStats]:
        """Health (True, False, None: not known yet), last error, last change and success, and counters."""
        return self._destinations.stats()
