"""The journal in PostgreSQL: one database that several gateways on one spool share (issue #14).

The same contract as the SQLite journal (`tests/test_journal_contract.py` runs against both): the delivery
rows and their history here; the instance memory and the destinations in pg_parts; nodes, leases and file
ownership in nodes_book (the same SQL as SQLite's, with the database server's clock).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from relaypacsd import nodes_book, pg_backlog, pg_history, pg_parts
from relaypacsd.history_sqlite import HistoryMethods
from relaypacsd.config import Secret
from relaypacsd.journal import (CONFLICT_EVENT, INSTANCE_MEMORY_DAYS, DeliveryRow, DestinationStats, Ensure,
                                FileFacts, KnownInstance, Update)
from relaypacsd.nodes_book import NodeBook, NodeMethods
from relaypacsd.pg_db import PgDatabase, Statement
from relaypacsd.sqlite_backlog import FACTS, SET_FACTS, BacklogMethods, values_of
from relaypacsd.timefmt import iso_time

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    path TEXT NOT NULL,
    dest TEXT NOT NULL,
    sop TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try DOUBLE PRECISION NOT NULL DEFAULT 0,
    first_seen DOUBLE PRECISION NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    last_code INTEGER,
    updated DOUBLE PRECISION NOT NULL,
    token TEXT NOT NULL DEFAULT '',
    route TEXT NOT NULL DEFAULT '',  -- the [[route]] names that gave the file this destination
    PRIMARY KEY (path, dest)
);
CREATE INDEX IF NOT EXISTS deliveries_dest ON deliveries(dest, state);
-- Paths in byte order whatever the database's collation: a folder is one range of it (paths_under's pages).
CREATE INDEX IF NOT EXISTS deliveries_path_c ON deliveries((path COLLATE "C"));
CREATE TABLE IF NOT EXISTS history (
    id BIGSERIAL PRIMARY KEY,
    path TEXT NOT NULL,
    dest TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    token TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS history_path ON history(path);
"""
PATH_RANGE = 'path COLLATE "C" >= %s AND path COLLATE "C" < %s'  # a folder's paths: see paths_under
_ROW = "path, dest, state, attempts, next_try, first_seen, last_error, last_code, route"
_HISTORY = "INSERT INTO history (path, dest, time, event, detail) VALUES (%s, %s, %s, %s, %s)"


def _clock(store: PgDatabase) -> float:
    return float(store.query("SELECT extract(epoch from clock_timestamp())::float8")[0][0])


class PgJournal(HistoryMethods, NodeMethods, BacklogMethods):
    """Thread-safe access to a PostgreSQL journal; reconnects by itself once the server is back."""

    shared = True

    def __init__(self, url: str, password: Secret = Secret(""), instance_days: float = INSTANCE_MEMORY_DAYS, *,
                 readonly: bool = False, application: str = "relaypacsd"):
        self.url = url
        self.instance_days = instance_days
        self._store = PgDatabase(url, password, readonly=readonly, application=application,
                                 schema=SCHEMA + pg_parts.SCHEMA + pg_history.SCHEMA + nodes_book.POSTGRES.schema()
                                 + pg_backlog.SCHEMA)
        self.shown = self._store.shown
        self._instances = pg_parts.PgInstances(self._store, instance_days)
        self._destinations = pg_parts.PgDestinations(self._store)
        self._history = pg_history.PgHistory(self._store)
        self._nodes = NodeBook(self._store, nodes_book.POSTGRES, lambda: _clock(self._store))
        self._backlog = pg_backlog.PgBacklog(self._store, self._nodes)

    def close(self) -> None:
        """Close the connection."""
        self._store.close()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self._store.query(sql, args)

    def _tx(self, statements: list[Statement]) -> None:
        self._store.transaction(statements)

    def rows(self, path: str) -> dict[str, DeliveryRow]:
        """Every destination's row for one file."""
        return {r[1]: DeliveryRow(*r) for r in self._exec(f"SELECT {_ROW} FROM deliveries WHERE path = %s", (path,))}

    def ensure(self, path: str, dests: Iterable[str], first_seen: float | None = None,
               sop: str = "", route: str = "", keep: bool = False, facts: FileFacts | None = None,
               backlog: bool = False) -> dict[str, DeliveryRow]:
        """Create pending rows (carrying `route`) for the destinations a file has none for (dropping another
        instance's rows under the same path first); with `keep` (routing) a file that has rows keeps exactly
        those. With `facts`, every row of the file keeps them and the backlog mark (`backlog`). A fenced node
        owns the file from now on if nobody does. Returns all rows."""
        return self.ensure_many([Ensure(path, tuple(dests), first_seen, sop, route, keep, facts, backlog)])[0]

    def ensure_many(self, files: list[Ensure]) -> list[dict[str, DeliveryRow]]:
        """`ensure` for several files in one transaction; each file's rows, in order."""
        now = time.time()
        stmts: list[Statement] = []
        for f in files:
            stmts += self._ensure_statements(f, now) + self._nodes.own_statements(f.path)
        # The rows read in the same message and transaction: one round trip less per group claimed (the intake
        # waits on the journal's one connection, not on its CPU).
        paths = [f.path for f in files]
        found = self._store.transaction(stmts + [(f"SELECT {_ROW} FROM deliveries WHERE path = ANY(%s)", (paths,))])
        rows: dict[str, dict[str, DeliveryRow]] = {p: {} for p in paths}
        for r in found:
            rows[r[0]][r[1]] = DeliveryRow(*r)
        return [rows[p] for p in paths]

    @staticmethod
    def _ensure_statements(f: Ensure, now: float) -> list[Statement]:
        path, sop, dests, route, seen = f.path, f.sop, list(f.dests), f.route, f.first_seen or now
        stmts: list[Statement] = []
        if sop:
            stale = "SELECT 1 FROM deliveries WHERE path = %s AND sop != '' AND sop != %s"
            stmts += [(f"DELETE FROM history WHERE path = %s AND EXISTS ({stale})", (path, path, sop)),
                      ("DELETE FROM deliveries WHERE path = %s AND sop != '' AND sop != %s", (path, sop))]
        if dests:
            # One statement: its look at the file's rows (with `keep`) is taken once, before any row is written.
            keeping = " WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE path = %s)" if f.keep else ""
            stmts.append(("INSERT INTO deliveries (path, dest, sop, state, first_seen, updated, route) SELECT %s, d, %s, "
                          f"'pending', %s, %s, %s FROM unnest(%s::text[]) AS d{keeping} ON CONFLICT (path, dest) DO NOTHING",
                          (path, sop, seen, now, route, dests) + ((path,) if f.keep else ())))
        if f.facts is None:
            stmts.append(("UPDATE deliveries SET token = '' WHERE path = %s AND token != ''", (path,)))
        else:  # the same one statement: every row of the file (at any PACS) holds its facts and one mark
            stmts.append((nodes_book.POSTGRES.sql(f"UPDATE deliveries SET token = '', {SET_FACTS}, backlog = ? "
                                                  "WHERE path = ?"), (*values_of(f.facts), int(f.backlog), path)))
        return stmts

    def update(self, path: str, dest: str, *, state: str, event: str, detail: str = "",
               attempts: int | None = None, next_try: float = 0.0, code: int | None = None) -> None:
        """Record a new state for one file at one destination, with a history line."""
        self.apply([Update(path, dest, state, event, detail, attempts, next_try, code)])

    def apply(self, updates: list[Update]) -> None:
        """Record several new states in one transaction, sent as one pipeline (one batch's answer, one commit)."""
        now = time.time()
        stmts: list[Statement] = []
        delivered: dict[str, int] = {}
        failed: dict[str, int] = {}
        for u in updates:
            sets = "state = %s, next_try = %s, updated = %s, last_error = %s, last_code = %s"
            args: list[Any] = [u.state, u.next_try, now, u.detail if u.state != "delivered" else "", u.code]
            if u.attempts is not None:
                sets += ", attempts = %s"
                args.append(u.attempts)
            stmts.append((f"UPDATE deliveries SET {sets} WHERE path = %s AND dest = %s", tuple(args + [u.path, u.dest])))
            stmts.append((_HISTORY, (u.path, u.dest, now, u.event, u.detail)))
            if u.state == "delivered":
                delivered[u.dest] = delivered.get(u.dest, 0) + 1
            elif u.state == "failed":
                failed[u.dest] = failed.get(u.dest, 0) + 1
            stmts += self._instances.statements(u, now)
        stmts += self._destinations.count_statements(delivered, failed, now)
        stmts += self._history.statements([u.record for u in updates if u.record is not None])
        if stmts:
            self._store.transaction(stmts, self._nodes.guard())  # a node taken over writes nothing: LeaseLost

    def remember(self, updates: list[Update]) -> None:
        """Only the lasting memory's part of 'delivered' updates (and their history records); no row moves."""
        self._instances.remember(updates, self._history.statements([u.record for u in updates if u.record]))

    def known_instances(self, dest: str, sops: Iterable[str]) -> dict[str, KnownInstance]:
        """What `dest` confirmed earlier under these SOP Instance UIDs."""
        return self._instances.known(dest, sops)

    def prune_instances(self, limit: int = pg_parts.PRUNE_STEP) -> int:
        """Drop up to `limit` remembered instances older than `instance_days`; return how many went."""
        return self._instances.prune(limit)

    def restore(self, path: str, sop: str, first_seen: float, updates: list[Update], route: str = "") -> None:
        """Write back rows that went missing under a settled file, with a history line; no counter moves."""
        now = time.time()
        stmts: list[Statement] = []
        for u in updates:
            stmts += [("INSERT INTO deliveries (path, dest, sop, state, attempts, next_try, first_seen, last_error, "
                       "last_code, updated, route) VALUES (%s, %s, %s, %s, %s, 0, %s, %s, %s, %s, %s) ON CONFLICT "
                       "(path, dest) DO UPDATE SET sop = excluded.sop, state = excluded.state, attempts = "
                       "excluded.attempts, next_try = 0, first_seen = excluded.first_seen, last_error = "
                       "excluded.last_error, last_code = excluded.last_code, updated = excluded.updated, "
                       "route = excluded.route, token = ''",
                       (path, u.dest, sop, u.state, u.attempts or 0, first_seen,
                        u.detail if u.state != "delivered" else "", u.code, now, route)),
                      (_HISTORY, (path, u.dest, now, u.event, f"(restored from the daemon's memory) {u.detail}"))]
        if stmts:
            self._tx(stmts)

    def rows_at(self, dest: str, paths: list[str]) -> dict[str, DeliveryRow]:
        """One destination's rows for several files, in one query."""
        found = self._exec(f"SELECT {_ROW} FROM deliveries WHERE dest = %s AND path = ANY(%s)", (dest, list(paths)))
        return {r[0]: DeliveryRow(*r) for r in found}

    def rows_of(self, paths: list[str]) -> dict[str, dict[str, DeliveryRow]]:
        """Every destination's rows for several files, in one query."""
        out: dict[str, dict[str, DeliveryRow]] = {p: {} for p in paths}
        for r in self._exec(f"SELECT {_ROW} FROM deliveries WHERE path = ANY(%s)", (list(paths),)):
            out[r[0]][r[1]] = DeliveryRow(*r)
        return out

    def history(self, path: str) -> list[dict[str, Any]]:
        """The history of one file, oldest first, for its sidecar."""
        found = self._exec("SELECT time, dest, event, detail FROM history WHERE path = %s ORDER BY id", (path,))
        return [{"time": iso_time(t), "pacs": d, "event": e, "detail": x} for t, d, e, x in found]

    def rename(self, old: str, new: str) -> None:
        """Follow a file that moved out of sending/ (or back); rows of a file once at `new` go; nobody owns it."""
        self._tx([("DELETE FROM deliveries WHERE path = %s", (new,)), ("DELETE FROM history WHERE path = %s", (new,)),
                  # Out of the backlog: a file in failed/ is never taken in, even once a retry resets its rows.
                  ("UPDATE deliveries SET path = %s, backlog = 0 WHERE path = %s", (new, old)),
                  ("UPDATE history SET path = %s WHERE path = %s", (new, old))] + self._nodes.release_statements([old, new]))

    def copy(self, old: str, new: str, token: str) -> bool:
        """Give `new` the rows and history of `old` too, marked with `token`, only when `new` holds none: the look
        and the write under one table lock (a retry is rare), so a node's claim there is never replaced."""
        # Not the backlog mark: a retried file is validated again, and its submission places it.
        cols = "dest, sop, state, attempts, next_try, first_seen, last_error, last_code, updated, route, " + ", ".join(FACTS)
        found = self._store.transaction([
            ("LOCK TABLE deliveries IN SHARE ROW EXCLUSIVE MODE", ()),
            ("DELETE FROM history WHERE path = %s AND NOT EXISTS (SELECT 1 FROM deliveries WHERE path = %s)", (new, new)),
            ("INSERT INTO history (path, token, dest, time, event, detail) SELECT %s, %s, dest, time, event, detail "
             "FROM history WHERE path = %s AND NOT EXISTS (SELECT 1 FROM deliveries WHERE path = %s) ORDER BY id",
             (new, token, old, new)),
            (f"INSERT INTO deliveries (path, token, {cols}) SELECT %s, %s, {cols} FROM deliveries WHERE path = %s "
             "AND NOT EXISTS (SELECT 1 FROM deliveries WHERE path = %s)", (new, token, old, new)),
            ("SELECT COUNT(*) FROM deliveries WHERE path = %s AND token != %s", (new, token))])
        return found[0][0] == 0  # rows there that are not this copy's: `new` was taken, nothing was copied

    def uncopy(self, new: str, token: str) -> None:
        """Take back what copy(old, new, token) wrote, and only that."""
        self._tx([("DELETE FROM deliveries WHERE path = %s AND token = %s", (new, token)),
                  ("DELETE FROM history WHERE path = %s AND token = %s", (new, token))])

    def forget(self, *paths: str) -> None:
        """Drop files that need no memory any more (in sent/, or changed), in one transaction; nobody owns them."""
        if paths:
            keys = list(paths)
            self._tx([("DELETE FROM deliveries WHERE path = ANY(%s)", (keys,)), ("DELETE FROM history WHERE path = ANY(%s)",
                      (keys,)), ("DELETE FROM owners WHERE key = ANY(%s)", (keys,))])

    def sop_of(self, path: str) -> str:
        """The SOP Instance UID the rows of `path` are about ('' when unknown)."""
        found = self._exec("SELECT sop FROM deliveries WHERE path = %s AND sop != '' LIMIT 1", (path,))
        return found[0][0] if found else ""

    def paths_under(self, folder: str, after: str = "", limit: int = 0) -> list[str]:
        """File paths with rows beneath `folder`, in order; a page of `limit` (0: all) of those after `after`.

        A range of the byte-ordered path index (every path below the folder sorts between "folder/" and
        "folder0" in the C collation, whatever the database's own), so a page costs its own rows."""
        prefix = folder.rstrip("/") + "/"
        page = " LIMIT %s" if limit else ""
        return [r[0] for r in self._exec(
            f'SELECT DISTINCT path COLLATE "C" FROM deliveries WHERE {PATH_RANGE} AND path COLLATE "C" > %s '
            f'ORDER BY 1{page}', (prefix, prefix[:-1] + "0", after, *((limit,) if limit else ())))]

    def reset_failed(self, path: str, reason: str = "operator retry") -> list[str]:
        """Operator retry: 'failed' rows back to 'pending' (fresh attempts and age); 'delivered' rows stay; a
        PACS where the file had a UID conflict forgets the other version. Returns the reset destinations."""
        now = time.time()
        found = self._exec("SELECT dest, sop FROM deliveries WHERE path = %s AND state = 'failed'", (path,))
        dests = [r[0] for r in found]
        conflicted = self.conflicted(path)
        stmts = self._instances.forget_statements((dest, sop) for dest, sop in found if dest in conflicted)
        stmts += [("UPDATE deliveries SET state = 'pending', attempts = 0, next_try = 0, last_error = '', "
                   "last_code = NULL, updated = %s WHERE path = %s AND state = 'failed'", (now, path)),
                  ("UPDATE deliveries SET first_seen = %s WHERE path = %s", (now, path))]
        stmts += [(_HISTORY, (path, d, now, "retry", reason)) for d in dests]
        self._tx(stmts)
        return dests

    def conflicted(self, path: str) -> set[str]:
        """The destinations whose last word on this file was a UID conflict."""
        last = {dest: event for dest, event in
                self._exec("SELECT dest, event FROM history WHERE path = %s ORDER BY id", (path,))}
        return {dest for dest, event in last.items() if event == CONFLICT_EVENT}

    def begin_run(self, dests: Iterable[str]) -> None:
        """A node (re)starts: the health of every destination is unknown until it finds out."""
        self._destinations.begin_run(dests)

    def set_health(self, dest: str, healthy: bool, error: str = "") -> None:
        """Remember a destination's health for `relaypacsd status`."""
        self._destinations.set_health(dest, healthy, error)

    def destinations(self) -> dict[str, DestinationStats]:
        """Health and counters per destination."""
        return self._destinations.stats()

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of rows per destination and state."""
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in self._exec("SELECT dest, state, COUNT(*) FROM deliveries GROUP BY dest, state"):
            out.setdefault(dest, {})[state] = n
        return out

    def route_counts(self) -> dict[str, int]:
        """Files that some destination still owes (pending or waiting), per route name ('' unrouted)."""
        return dict(self._exec("SELECT route, COUNT(DISTINCT path) FROM deliveries WHERE state IN ('pending', "
                               "'waiting') GROUP BY route"))
