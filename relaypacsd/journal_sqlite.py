"""The journal in SQLite (WAL): one file in the state directory, read while the daemon writes.

`Journal` (relaypacsd.journal) is the contract; `tests/test_journal_contract.py` checks it.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from relaypacsd.errors import JournalError
from relaypacsd.journal import (CONFLICT_EVENT, HEALTH_UNKNOWN, INSTANCE_MEMORY_DAYS, DeliveryRow, DestinationStats,
                                KnownInstance, Update, health_of)
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
CREATE TABLE IF NOT EXISTS destinations (
    dest TEXT PRIMARY KEY,
    healthy INTEGER NOT NULL,       -- 1 up, 0 down, -1 unknown (this run has not found out yet)
    last_error TEXT NOT NULL DEFAULT '',
    last_change REAL NOT NULL,
    last_success REAL,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
);
"""

# Lasting memory of what each PACS confirmed, by SOP Instance UID: the rows above go once a file leaves
# sending/, and a PACS such as Orthanc answers success for a second file with a known UID while it keeps
# the first one (see README, "UID conflict"). Kept for INSTANCE_MEMORY_DAYS.
INSTANCES_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    dest TEXT NOT NULL,
    sop TEXT NOT NULL,
    digest TEXT NOT NULL,           -- sha256 of the whole file the PACS confirmed
    path TEXT NOT NULL,             -- where that file was when it was delivered (sending/...)
    time REAL NOT NULL,
    PRIMARY KEY (dest, sop)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_time ON instances(time);
"""
# Columns added after the first release: (table, column, definition). Added in place to older journals.
ADDED_COLUMNS = [
    ("destinations", "conflicts", "INTEGER NOT NULL DEFAULT 0"),
    # A `relaypacsd retry` marks the rows it copies ahead of a file, so it can take back exactly those.
    ("deliveries", "token", "TEXT NOT NULL DEFAULT ''"),
    ("history", "token", "TEXT NOT NULL DEFAULT ''"),
]
PRUNE_EVERY = 256  # delivered instances between two pruning steps
PRUNE_STEP = 1024  # at most this many expired instances per step: four times the intake, in small commits


class SqliteJournal:
    """Thread-safe access to the journal database in the state directory."""

    def __init__(self, path: Path, instance_days: float = INSTANCE_MEMORY_DAYS, *, readonly: bool = False):
        self.path = path
        self.instance_days = instance_days
        self._confirmations = itertools.count(1)  # next() is atomic: workers apply from several threads
        self._lock = threading.Lock()
        try:
            self._db = self._open_readonly() if readonly else self._open()
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(str(exc)) from exc

    def _open(self) -> sqlite3.Connection:
        """Open for the daemon: create the database or upgrade an older one in place."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only an OS crash may lose the last commits,
        # and then the files are simply sent again.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        db.executescript(INSTANCES_SCHEMA)
        _add_columns(db)
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        """Open to look only (WAL lets a command read while the daemon writes): no schema, no upgrade."""
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None,
                               timeout=5)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: {exc}") from exc

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def rows(self, path: str) -> dict[str, DeliveryRow]:
        """Every destination's row for one file."""
        found = self._exec("SELECT path, dest, state, attempts, next_try, first_seen, last_error, last_code "
                           "FROM deliveries WHERE path = ?", (path,))
        return {r[1]: DeliveryRow(*r) for r in found}

    def ensure(self, path: str, dests: Iterable[str], first_seen: float | None = None,
               sop: str = "") -> dict[str, DeliveryRow]:
        """Create pending rows for the destinations a file has none for; return all rows.

        Rows left under the same path by another instance (a modality reusing IMG0001.dcm) are dropped
        first: they must never make a new file look delivered."""
        now = time.time()
        seen = first_seen or now
        stmts: list[tuple[str, tuple[Any, ...]]] = []
        if sop:
            stale = "SELECT 1 FROM deliveries WHERE path = ? AND sop != '' AND sop != ?"
            stmts += [(f"DELETE FROM history WHERE path = ? AND EXISTS ({stale})", (path, path, sop)),
                      ("DELETE FROM deliveries WHERE path = ? AND sop != '' AND sop != ?", (path, sop))]
        stmts += [("INSERT OR IGNORE INTO deliveries (path, dest, sop, state, first_seen, updated) "
                   "VALUES (?, ?, ?, 'pending', ?, ?)", (path, d, sop, seen, now)) for d in dests]
        # Rows a retry copied here are now this file's: the retry must no longer take them back (uncopy).
        stmts.append(("UPDATE deliveries SET token = '' WHERE path = ? AND token != ''", (path,)))
        self._tx(stmts)
        return self.rows(path)

    def update(self, path: str, dest: str, *, state: str, event: str, detail: str = "",
               attempts: int | None = None, next_try: float = 0.0, code: int | None = None) -> None:
        """Record a new state for one file at one destination, with a history line."""
        self.apply([Update(path, dest, state, event, detail, attempts, next_try, code)])

    def apply(self, updates: list["Update"]) -> None:
        """Record several new states in one transaction (one batch's answer is one commit)."""
        now = time.time()
        stmts: list[tuple[str, tuple[Any, ...]]] = []
        delivered: dict[str, int] = {}
        failed: dict[str, int] = {}
        for u in updates:
            sets = "state = ?, next_try = ?, updated = ?, last_error = ?, last_code = ?"
            args: list[Any] = [u.state, u.next_try, now, u.detail if u.state != "delivered" else "", u.code]
            if u.attempts is not None:
                sets += ", attempts = ?"
                args.append(u.attempts)
            stmts.append((f"UPDATE deliveries SET {sets} WHERE path = ? AND dest = ?", tuple(args + [u.path, u.dest])))
            stmts.append(("INSERT INTO history (path, dest, time, event, detail) VALUES (?, ?, ?, ?, ?)",
                          (u.path, u.dest, now, u.event, u.detail)))
            if u.state == "delivered":
                delivered[u.dest] = delivered.get(u.dest, 0) + 1
            elif u.state == "failed":
                failed[u.dest] = failed.get(u.dest, 0) + 1
            stmts += self._instance_statements(u, now)
        stmts += [_count_delivered(dest, n, now) for dest, n in delivered.items()]
        stmts += [_count_failed(dest, n, now) for dest, n in failed.items()]
        if stmts:
            self._tx(stmts)

    def _instance_statements(self, u: Update, now: float) -> list[tuple[str, tuple[Any, ...]]]:
        """The lasting memory's part of one update: remember a confirmed instance, count a UID conflict, and
        every PRUNE_EVERY confirmations drop a small step of instances older than `instance_days`."""
        if u.event == CONFLICT_EVENT:
            # An upsert like the other counters: the first conflict may come before the destination's row.
            return [("INSERT INTO destinations (dest, healthy, last_change, conflicts) VALUES (?, ?, ?, 1) "
                     "ON CONFLICT(dest) DO UPDATE SET conflicts = conflicts + 1", (u.dest, HEALTH_UNKNOWN, now))]
        if u.state != "delivered" or not u.digest or not u.sop:
            return []
        stmts: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT INTO instances (dest, sop, digest, path, time) VALUES (?, ?, ?, ?, ?) ON CONFLICT(dest, sop) "
             "DO UPDATE SET digest = excluded.digest, path = excluded.path, time = excluded.time",
             (u.dest, u.sop, u.digest, u.path, now))]
        if next(self._confirmations) % PRUNE_EVERY == 0:
            stmts.append(("DELETE FROM instances WHERE (dest, sop) IN (SELECT dest, sop FROM instances "
                          "WHERE time < ? ORDER BY time LIMIT ?)", (now - self.instance_days * 86400, PRUNE_STEP)))
        return stmts

    def remember(self, updates: list[Update]) -> None:
        """Only the lasting memory's part of 'delivered' updates: what a PACS confirmed of a file dropped
        meanwhile (it changed); its rows are another version's now and must not move."""
        now = time.time()
        stmts = [s for u in updates for s in self._instance_statements(u, now)]
        if stmts:
            self._tx(stmts)

    def known_instances(self, dest: str, sops: Iterable[str]) -> dict[str, KnownInstance]:
        """What `dest` confirmed earlier under these SOP Instance UIDs (the lasting memory), in one query."""
        wanted = sorted(set(sops))
        out: dict[str, KnownInstance] = {}
        for i in range(0, len(wanted), 500):  # SQLite's parameter limit
            chunk = wanted[i:i + 500]
            found = self._exec(f"SELECT sop, digest, path, time FROM instances WHERE dest = ? "
                               f"AND sop IN ({','.join('?' * len(chunk))})", [dest, *chunk])
            out.update({r[0]: KnownInstance(r[1], r[2], r[3]) for r in found})
        return out

    def prune_instances(self, limit: int = PRUNE_STEP) -> int:
        """Drop up to `limit` remembered instances older than `instance_days`; return how many went."""
        cutoff = time.time() - self.instance_days * 86400
        with self._lock:
            cur = self._db.execute("DELETE FROM instances WHERE (dest, sop) IN (SELECT dest, sop FROM instances "
                                   "WHERE time < ? ORDER BY time LIMIT ?)", (cutoff, limit))
            return cur.rowcount

    def restore(self, path: str, sop: str, first_seen: float, updates: list[Update]) -> None:
        """Write back rows that went missing under a file the engine settled (from its memory), with a history
        line, so its sidecar and a later `relaypacsd retry` know what each PACS said. No counter moves."""
        now = time.time()
        stmts: list[tuple[str, tuple[Any, ...]]] = []
        for u in updates:
            stmts += [("INSERT OR REPLACE INTO deliveries (path, dest, sop, state, attempts, next_try, first_seen, "
                       "last_error, last_code, updated) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
                       (path, u.dest, sop, u.state, u.attempts or 0, first_seen,
                        u.detail if u.state != "delivered" else "", u.code, now)),
                      ("INSERT INTO history (path, dest, time, event, detail) VALUES (?, ?, ?, ?, ?)",
                       (path, u.dest, now, u.event, f"(restored from the daemon's memory) {u.detail}"))]
        if stmts:
            self._tx(stmts)

    def rows_at(self, dest: str, paths: list[str]) -> dict[str, DeliveryRow]:
        """One destination's rows for several files, in one query."""
        out: dict[str, DeliveryRow] = {}
        for i in range(0, len(paths), 500):  # SQLite's parameter limit
            chunk = paths[i:i + 500]
            found = self._exec("SELECT path, dest, state, attempts, next_try, first_seen, last_error, last_code "
                               f"FROM deliveries WHERE dest = ? AND path IN ({','.join('?' * len(chunk))})",
                               [dest, *chunk])
            out.update({r[0]: DeliveryRow(*r) for r in found})
        return out

    def history(self, path: str) -> list[dict[str, Any]]:
        """The history of one file, oldest first, for its sidecar."""
        found = self._exec("SELECT time, dest, event, detail FROM history WHERE path = ? ORDER BY id", (path,))
        return [{"time": iso_time(t), "pacs": d, "event": e, "detail": x} for t, d, e, x in found]

    def rename(self, old: str, new: str) -> None:
        """Follow a file that moved (sending/ -> failed/ and back); rows of a file once at `new` go."""
        self._tx([("DELETE FROM deliveries WHERE path = ?", (new,)), ("DELETE FROM history WHERE path = ?", (new,)),
                  ("UPDATE deliveries SET path = ? WHERE path = ?", (new, old)),
                  ("UPDATE history SET path = ? WHERE path = ?", (new, old))])

    def copy(self, old: str, new: str, token: str) -> bool:
        """Give `new` the rows and history of `old` as well (a file about to move there), marked with `token`;
        `old` keeps its own until the file has landed. Only when `new` holds no rows: one look-and-write
        transaction, so rows a daemon writes there meanwhile (a file it claimed) are never replaced.
        Returns False, copying nothing, when `new` is taken."""
        cols = "dest, sop, state, attempts, next_try, first_seen, last_error, last_code, updated"
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
        stmts: list[tuple[str, tuple[Any, ...]]] = []
        for path in paths:
            stmts += [("DELETE FROM deliveries WHERE path = ?", (path,)), ("DELETE FROM history WHERE path = ?", (path,))]
        if stmts:
            self._tx(stmts)

    def sop_of(self, path: str) -> str:
        """The SOP Instance UID the rows of `path` are about ('' when unknown)."""
        found = self._exec("SELECT sop FROM deliveries WHERE path = ? AND sop != '' LIMIT 1", (path,))
        return found[0][0] if found else ""

    def paths_under(self, folder: str) -> list[str]:
        """Every file path with rows, beneath `folder`."""
        prefix = folder.rstrip(os.sep) + os.sep
        return [r[0] for r in self._exec("SELECT DISTINCT path FROM deliveries WHERE substr(path, 1, ?) = ?",
                                         (len(prefix), prefix))]

    def rows_of(self, paths: list[str]) -> dict[str, dict[str, DeliveryRow]]:
        """Every destination's rows for several files, in one query."""
        out: dict[str, dict[str, DeliveryRow]] = {p: {} for p in paths}
        for i in range(0, len(paths), 500):  # SQLite's parameter limit
            chunk = paths[i:i + 500]
            found = self._exec("SELECT path, dest, state, attempts, next_try, first_seen, last_error, last_code "
                               f"FROM deliveries WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            for r in found:
                out[r[0]][r[1]] = DeliveryRow(*r)
        return out

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
        stmts: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM instances WHERE dest = ? AND sop = ?", (dest, sop))
            for dest, sop in found if sop and dest in conflicted]
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
        """A daemon (re)starts: every destination's health is unknown until this run finds out, so status
        never shows an earlier run's DOWN as current; each active destination gets its row. Counters stay."""
        now = time.time()
        self._tx([("UPDATE destinations SET healthy = ?, last_change = ?", (HEALTH_UNKNOWN, now))]
                 + [("INSERT OR IGNORE INTO destinations (dest, healthy, last_change) VALUES (?, ?, ?)",
                     (d, HEALTH_UNKNOWN, now)) for d in dests])

    def set_health(self, dest: str, healthy: bool, error: str = "") -> None:
        """Remember a destination's health for `relaypacsd status`."""
        now = time.time()
        self._tx([("INSERT INTO destinations (dest, healthy, last_error, last_change) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(dest) DO UPDATE SET healthy = excluded.healthy, last_change = excluded.last_change, "
                   "last_error = CASE WHEN excluded.last_error = '' THEN last_error ELSE excluded.last_error END",
                   (dest, int(healthy), error, now))])

    def destinations(self) -> dict[str, DestinationStats]:
        """Health (True, False, None: not known yet), last error, last change and success, and counters."""
        # A journal no daemon has upgraded yet (read-only here) has no conflicts column: none counted then.
        conflicts = "conflicts" if self._has_column("destinations", "conflicts") else "0"
        found = self._exec("SELECT dest, healthy, last_error, last_change, last_success, delivered, failed, "
                           f"{conflicts} FROM destinations")
        return {r[0]: DestinationStats(healthy=health_of(r[1]), last_error=r[2], last_change=r[3], last_success=r[4],
                                       delivered=r[5], failed=r[6], conflicts=r[7]) for r in found}

    def _has_column(self, table: str, column: str) -> bool:
        return column in {r[1] for r in self._exec(f"PRAGMA table_info({table})")}

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of rows per destination and state."""
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in self._exec("SELECT dest, state, COUNT(*) FROM deliveries GROUP BY dest, state"):
            out.setdefault(dest, {})[state] = n
        return out


def _count_delivered(dest: str, n: int, now: float) -> tuple[str, tuple[Any, ...]]:
    # A delivery is evidence of health: a row still unknown turns up. A DOWN one stays down: the probe, under
    # the destination's lock, decides that, so the journal never disagrees with the running daemon.
    return ("INSERT INTO destinations (dest, healthy, last_change, last_success, delivered) VALUES (?, 1, ?, ?, ?) "
            "ON CONFLICT(dest) DO UPDATE SET last_success = excluded.last_success, delivered = delivered + excluded.delivered, "
            f"last_change = CASE WHEN healthy = {HEALTH_UNKNOWN} THEN excluded.last_change ELSE last_change END, "
            f"healthy = CASE WHEN healthy = {HEALTH_UNKNOWN} THEN 1 ELSE healthy END", (dest, now, now, n))


def _count_failed(dest: str, n: int, now: float) -> tuple[str, tuple[Any, ...]]:
    # A rejected file says nothing about the PACS's health.
    return ("INSERT INTO destinations (dest, healthy, last_change, failed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(dest) DO UPDATE SET failed = failed + excluded.failed", (dest, HEALTH_UNKNOWN, now, n))


def _add_columns(db: sqlite3.Connection) -> None:
    """Upgrade an older journal in place: add the columns it lacks (SQLite has no ADD COLUMN IF NOT EXISTS)."""
    for table, column, definition in ADDED_COLUMNS:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if column in have:
            continue
        try:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process (a command) added it just now
                raise
