"""Each PACS's health and lasting counters in the SQLite journal, for `relaypacsd status` and the metrics."""

from __future__ import annotations

import time
from typing import Iterable

from relaypacsd.journal import HEALTH_UNKNOWN, DestinationStats, health_of
from relaypacsd.sqlite_db import Database, Statement

SCHEMA = """
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


class DestinationBook:
    """The destinations table: health as the last probe or delivery saw it, and delivered/failed/conflict counts."""

    def __init__(self, store: Database):
        self.store = store

    def begin_run(self, dests: Iterable[str]) -> None:
        """A daemon (re)starts: every destination's health is unknown until this run finds out, so status
        never shows an earlier run's DOWN as current; each active destination gets its row. Counters stay."""
        now = time.time()
        self.store.transaction([("UPDATE destinations SET healthy = ?, last_change = ?", (HEALTH_UNKNOWN, now))]
                               + [("INSERT OR IGNORE INTO destinations (dest, healthy, last_change) VALUES (?, ?, ?)",
                                   (d, HEALTH_UNKNOWN, now)) for d in dests])

    def set_health(self, dest: str, healthy: bool, error: str = "") -> None:
        """Remember a destination's health for `relaypacsd status`."""
        self.store.transaction([(
            "INSERT INTO destinations (dest, healthy, last_error, last_change) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(dest) DO UPDATE SET healthy = excluded.healthy, last_change = excluded.last_change, "
            "last_error = CASE WHEN excluded.last_error = '' THEN last_error ELSE excluded.last_error END",
            (dest, int(healthy), error, time.time()))])

    def stats(self) -> dict[str, DestinationStats]:
        """Health (True, False, None: not known yet), last error, last change and success, and counters."""
        # A journal no daemon has upgraded yet (read-only here) has no conflicts column: none counted then.
        conflicts = "conflicts" if self.store.has_column("destinations", "conflicts") else "0"
        found = self.store.query("SELECT dest, healthy, last_error, last_change, last_success, delivered, failed, "
                                 f"{conflicts} FROM destinations")
        return {r[0]: DestinationStats(healthy=health_of(r[1]), last_error=r[2], last_change=r[3], last_success=r[4],
                                       delivered=r[5], failed=r[6], conflicts=r[7]) for r in found}

    def count_statements(self, delivered: dict[str, int], failed: dict[str, int], now: float) -> list[Statement]:
        """The counters' part of one batch's commit."""
        return ([_count_delivered(dest, n, now) for dest, n in delivered.items()]
                + [_count_failed(dest, n, now) for dest, n in failed.items()])


def _count_delivered(dest: str, n: int, now: float) -> Statement:
    # A delivery is evidence of health: a row still unknown turns up. A DOWN one stays down: the probe, under
    # the destination's lock, decides that, so the journal never disagrees with the running daemon.
    return ("INSERT INTO destinations (dest, healthy, last_change, last_success, delivered) VALUES (?, 1, ?, ?, ?) "
            "ON CONFLICT(dest) DO UPDATE SET last_success = excluded.last_success, delivered = delivered + excluded.delivered, "
            f"last_change = CASE WHEN healthy = {HEALTH_UNKNOWN} THEN excluded.last_change ELSE last_change END, "
            f"healthy = CASE WHEN healthy = {HEALTH_UNKNOWN} THEN 1 ELSE healthy END", (dest, now, now, n))


def _count_failed(dest: str, n: int, now: float) -> Statement:
    # A rejected file says nothing about the PACS's health.
    return ("INSERT INTO destinations (dest, healthy, last_change, failed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(dest) DO UPDATE SET failed = failed + excluded.failed", (dest, HEALTH_UNKNOWN, now, n))
