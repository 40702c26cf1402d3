"""The journal's lasting memory in SQLite: which instance each PACS confirmed, with which bytes.

The delivery rows go once a file leaves sending/, and a PACS such as Orthanc answers success for a second
file with a known UID while it keeps the first one (see README, "UID conflict"): this table keeps what was
confirmed for `instance_days`, pruned in small steps.
"""

from __future__ import annotations

import itertools
import time
from typing import Iterable

from relaypacsd.journal import CONFLICT_EVENT, HEALTH_UNKNOWN, KnownInstance, Update
from relaypacsd.sqlite_db import Database, Statement, in_lists

SCHEMA = """
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
PRUNE_EVERY = 256  # delivered instances between two pruning steps
PRUNE_STEP = 1024  # at most this many expired instances per step: four times the intake, in small commits
_PRUNE = ("DELETE FROM instances WHERE (dest, sop) IN (SELECT dest, sop FROM instances "
          "WHERE time < ? ORDER BY time LIMIT ?)")


class InstanceMemory:
    """What each PACS confirmed, by SOP Instance UID: the statements that record it, and the lookups."""

    def __init__(self, store: Database, instance_days: float):
        self.store = store
        self.instance_days = instance_days
        self._confirmations = itertools.count(1)  # next() is atomic: workers apply from several threads

    def statements(self, u: Update, now: float) -> list[Statement]:
        """The lasting memory's part of one update: remember a confirmed instance, count a UID conflict, and
        every PRUNE_EVERY confirmations drop a small step of instances older than `instance_days`."""
        if u.event == CONFLICT_EVENT:
            # An upsert like the other counters: the first conflict may come before the destination's row.
            return [("INSERT INTO destinations (dest, healthy, last_change, conflicts) VALUES (?, ?, ?, 1) "
                     "ON CONFLICT(dest) DO UPDATE SET conflicts = conflicts + 1", (u.dest, HEALTH_UNKNOWN, now))]
        if u.state != "delivered" or not u.digest or not u.sop:
            return []
        stmts: list[Statement] = [
            ("INSERT INTO instances (dest, sop, digest, path, time) VALUES (?, ?, ?, ?, ?) ON CONFLICT(dest, sop) "
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
        """What `dest` confirmed earlier under these SOP Instance UIDs, in one query per 500."""
        wanted = sorted(set(sops))
        out: dict[str, KnownInstance] = {}
        for marks, chunk in in_lists(wanted, 500):
            found = self.store.query(f"SELECT sop, digest, path, time FROM instances WHERE dest = ? "
                                     f"AND sop IN ({marks})", [dest, *chunk])
            out.update({r[0]: KnownInstance(r[1], r[2], r[3]) for r in found})
        return out

    def prune(self, limit: int = PRUNE_STEP) -> int:
        """Drop up to `limit` remembered instances older than `instance_days`; return how many went."""
        return self.store.change(_PRUNE, (time.time() - self.instance_days * 86400, limit))

    def forget_statements(self, found: Iterable[tuple[str, str]]) -> list[Statement]:
        """Forget what these (destination, SOP Instance UID) pairs confirmed: an operator retries a UID conflict."""
        return [("DELETE FROM instances WHERE dest = ? AND sop = ?", (dest, sop)) for dest, sop in found if sop]
