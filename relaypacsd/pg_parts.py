"""The PostgreSQL journal's lasting parts, as sqlite_instances and sqlite_destinations are SQLite's: what each
PACS confirmed (the instance memory, for UID conflicts), and each PACS's health and counters."""

from __future__ import annotations

import itertools
import time
from typing import Iterable

from relaypacsd.journal import CONFLICT_EVENT, HEALTH_UNKNOWN, DestinationStats, KnownInstance, Update, health_of
from relaypacsd.pg_db import PgDatabase, Statement

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    dest TEXT NOT NULL,
    sop TEXT NOT NULL,
    digest TEXT NOT NULL,
    path TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (dest, sop)
);
CREATE INDEX IF NOT EXISTS instances_time ON instances(time);
CREATE TABLE IF NOT EXISTS destinations (
    dest TEXT PRIMARY KEY,
    healthy INTEGER NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    last_change DOUBLE PRECISION NOT NULL,
    last_success DOUBLE PRECISION,
    delivered BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    conflicts BIGINT NOT NULL DEFAULT 0
);
"""
PRUNE_EVERY = 256
PRUNE_STEP = 1024
_PRUNE = ("DELETE FROM instances WHERE (dest, sop) IN (SELECT dest, sop FROM instances "
          "WHERE time < %s ORDER BY time LIMIT %s)")


class PgInstances:
    """What each PACS confirmed, by SOP Instance UID (see sqlite_instances.InstanceMemory)."""

    def __init__(self, store: PgDatabase, instance_days: float):
        self.store = store
        self.instance_days = instance_days
        self._confirmations = itertools.count(1)

    def statements(self, u: Update, now: float) -> list[Statement]:
        """The lasting memory's part of one update (a confirmed instance, a UID conflict counted, pruning)."""
        if u.event == CONFLICT_EVENT:
            return [("INSERT INTO destinations (dest, healthy, last_change, conflicts) VALUES (%s, %s, %s, 1) "
                     "ON CONFLICT (dest) DO UPDATE SET conflicts = destinations.conflicts + 1",
                     (u.dest, HEALTH_UNKNOWN, now))]
        if u.state != "delivered" or not u.digest or not u.sop:
            return []
        stmts: list[Statement] = [
            ("INSERT INTO instances (dest, sop, digest, path, time) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (dest, sop) "
             "DO UPDATE SET digest = excluded.digest, path = excluded.path, time = excluded.time",
             (u.dest, u.sop, u.digest, u.path, now))]
        if next(self._confirmations) % PRUNE_EVERY == 0:
            stmts.append((_PRUNE, (now - self.instance_days * 86400, PRUNE_STEP)))
        return stmts

    def remember(self, updates: list[Update], also: list[Statement] | None = None) -> None:
        """Only the lasting memory's part of 'delivered' updates (and `also`, in the same commit)."""
        now = time.time()
        stmts = [s for u in updates for s in self.statements(u, now)] + (also or [])
        if stmts:
            self.store.transaction(stmts)

    def known(self, dest: str, sops: Iterable[str]) -> dict[str, KnownInstance]:
        """What `dest` confirmed earlier under these SOP Instance UIDs, in one query."""
        found = self.store.query("SELECT sop, digest, path, time FROM instances WHERE dest = %s AND sop = ANY(%s)",
                                 (dest, sorted(set(sops))))
        return {r[0]: KnownInstance(r[1], r[2], r[3]) for r in found}

    def prune(self, limit: int = PRUNE_STEP) -> int:
        """Drop up to `limit` remembered instances older than `instance_days`; return how many went."""
        return self.store.change(_PRUNE, (time.time() - self.instance_days * 86400, limit))

    def forget_statements(self, found: Iterable[tuple[str, str]]) -> list[Statement]:
        """Forget what these (destination, SOP Instance UID) pairs confirmed (an operator retries a conflict)."""
        return [("DELETE FROM instances WHERE dest = %s AND sop = %s", (dest, sop)) for dest, sop in found if sop]


class PgDestinations:
    """Each PACS's health and counters (see sqlite_destinations.DestinationBook); shared by every node."""

    def __init__(self, store: PgDatabase):
        self.store = store

    def begin_run(self, dests: Iterable[str]) -> None:
        """A node (re)starts: the destinations it forwards to are unknown until it finds out; counters stay."""
        now = time.time()
        self.store.transaction([("UPDATE destinations SET healthy = %s, last_change = %s", (HEALTH_UNKNOWN, now))]
                               + [("INSERT INTO destinations (dest, healthy, last_change) VALUES (%s, %s, %s) "
                                   "ON CONFLICT (dest) DO NOTHING", (d, HEALTH_UNKNOWN, now)) for d in dests])

    def set_health(self, dest: str, healthy: bool, error: str = "") -> None:
        """Remember a destination's health (the last node to find out speaks for all; `status` shows each's)."""
        self.store.transaction([(
            "INSERT INTO destinations (dest, healthy, last_error, last_change) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (dest) DO UPDATE SET healthy = excluded.healthy, last_change = excluded.last_change, "
            "last_error = CASE WHEN excluded.last_error = '' THEN destinations.last_error ELSE excluded.last_error END",
            (dest, int(healthy), error, time.time()))])

    def stats(self) -> dict[str, DestinationStats]:
        """Health (True, False, None: not known yet), last error, last change and success, and counters."""
        found = self.store.query("SELECT dest, healthy, last_error, last_change, last_success, delivered, failed, "
                                 "conflicts FROM destinations")
        return {r[0]: DestinationStats(healthy=health_of(r[1]), last_error=r[2], last_change=r[3], last_success=r[4],
                                       delivered=r[5], failed=r[6], conflicts=r[7]) for r in found}

    def count_statements(self, delivered: dict[str, int], failed: dict[str, int], now: float) -> list[Statement]:
        """The counters' part of one batch's commit (a delivery turns an unknown health up; never lifts a DOWN)."""
        out: list[Statement] = []
        for dest, n in delivered.items():
            out.append((
                "INSERT INTO destinations (dest, healthy, last_change, last_success, delivered) VALUES (%s, 1, %s, %s, %s) "
                "ON CONFLICT (dest) DO UPDATE SET last_success = excluded.last_success, "
                "delivered = destinations.delivered + excluded.delivered, "
                f"last_change = CASE WHEN destinations.healthy = {HEALTH_UNKNOWN} THEN excluded.last_change "
                "ELSE destinations.last_change END, "
                f"healthy = CASE WHEN destinations.healthy = {HEALTH_UNKNOWN} THEN 1 ELSE destinations.healthy END",
                (dest, now, now, n)))
        for dest, n in failed.items():
            out.append(("INSERT INTO destinations (dest, healthy, last_change, failed) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (dest) DO UPDATE SET failed = destinations.failed + excluded.failed",
                        (dest, HEALTH_UNKNOWN, now, n)))
        return out
