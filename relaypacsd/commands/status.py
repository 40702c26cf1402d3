"""`status`: folders, ages, PACS health; safe while the daemon runs (`retry` is in commands/retry.py)."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from relaypacsd.commands.common import EXIT_OK, human_age, load, print_json, table
from relaypacsd.commands.common import short as _short
from relaypacsd.heartbeat import process_gone, read_heartbeat
from relaypacsd.journal import health_of
from relaypacsd.spool import Spool

JOURNAL_FILE = "journal.sqlite3"


def _folder_stats(spool: Spool) -> dict[str, Any]:
    counts, oldest = spool.stats()
    return {"root": str(spool.root), **counts, "oldest_waiting_seconds": None if oldest is None else round(oldest)}


def _read_journal(state_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]]]:
    """Destinations table and per-state counts, read-only (WAL lets us read while the daemon writes)."""
    path = state_dir / JOURNAL_FILE
    if not path.exists():
        return {}, {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return {}, {}
    try:
        dests = {}
        for r in db.execute("SELECT dest, healthy, last_error, last_change, last_success, delivered, failed FROM destinations"):
            dests[r[0]] = {"healthy": health_of(r[1]), "last_error": r[2], "last_change": r[3], "last_success": r[4],
                           "delivered": r[5], "failed": r[6]}
        counts: dict[str, dict[str, int]] = {}
        for dest, state, n in db.execute("SELECT dest, state, COUNT(*) FROM deliveries GROUP BY dest, state"):
            counts.setdefault(dest, {})[state] = n
        _read_conflicts(db, dests)
        return dests, counts
    except sqlite3.Error:
        return {}, {}
    finally:
        db.close()


def _read_conflicts(db: sqlite3.Connection, dests: dict[str, dict[str, Any]]) -> None:
    """Add each destination's UID-conflict count; a journal no daemon has upgraded yet has none."""
    try:
        found = db.execute("SELECT dest, conflicts FROM destinations").fetchall()
    except sqlite3.OperationalError:  # no such column: read-only here, so no upgrade
        return
    for dest, n in found:
        if dest in dests:
            dests[dest]["conflicts"] = n


def _daemon_state(state_dir: Path) -> dict[str, Any]:
    beat = read_heartbeat(state_dir)
    try:
        if beat is None:
            raise ValueError("no heartbeat")
        age = time.time() - float(beat.get("time", 0))
        running = age < 60 and not beat.get("stopped") and not process_gone(beat)  # as `health` judges it
        return {"running": running, "heartbeat_age_seconds": round(age), "pid": beat.get("pid"),
                "in_flight": beat.get("in_flight")}
    except ValueError:
        return {"running": False, "heartbeat_age_seconds": None, "pid": None, "in_flight": None}


def _iso(t: float | None) -> str | None:
    if not t:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def cmd_status(args: argparse.Namespace) -> int:
    """Folder counts, oldest waiting file, each PACS's health, last error and last success."""
    config = load(args)
    state_dir = Path(config.daemon.state_dir)
    roots = [_folder_stats(Spool(Path(w.path))) for w in config.watch]
    dests, counts = _read_journal(state_dir)
    daemon = _daemon_state(state_dir)
    now = time.time()
    pacs = []
    for p in config.active():
        d = dests.get(p.name, {})
        healthy = d.get("healthy")
        health = "unknown" if healthy is None else ("up" if healthy else "DOWN")
        # The daemon resets health to unknown at start, so while it runs a row is this run's finding; once
        # it stopped, what it last found is shown as such, never as current.
        pacs.append({"name": p.name, "target": p.stow_base, "health": health,
                     "health_current": bool(daemon["running"]) and healthy is not None,
                     "health_since": _iso(d.get("last_change")),
                     "last_error": d.get("last_error") or "", "last_success": _iso(d.get("last_success")),
                     "last_success_age_seconds": round(now - d["last_success"]) if d.get("last_success") else None,
                     "delivered": d.get("delivered", 0), "failed": d.get("failed", 0),
                     "uid_conflicts": d.get("conflicts", 0),
                     "waiting": counts.get(p.name, {}).get("waiting", 0) + counts.get(p.name, {}).get("pending", 0)})
    if args.json:
        print_json({"daemon": daemon, "watch": roots, "pacs": pacs})
        return EXIT_OK
    if daemon["running"]:
        print(f"daemon: running (pid {daemon['pid']}, heartbeat {human_age(daemon['heartbeat_age_seconds'])} ago, "
              f"{daemon['in_flight']} file(s) in flight)")
    else:
        print(f"daemon: not running (no fresh heartbeat in {state_dir})")
    print()
    print(table(["watch root", "inbox", "sending", "sent", "failed", "oldest waiting"],
                [[r["root"], r["inbox"], r["sending"], r["sent"], r["failed"], human_age(r["oldest_waiting_seconds"])]
                 for r in roots]) if roots else "no [[watch]] root configured")
    print()
    if pacs:
        print(table(["PACS", "health", "last success", "delivered", "failed", "UID conflicts", "waiting", "last error"],
                    [[p["name"], _health_text(p),
                      (human_age(p["last_success_age_seconds"]) + " ago") if p["last_success_age_seconds"] is not None else "never",
                      p["delivered"], p["failed"], p["uid_conflicts"], p["waiting"], _short(p["last_error"])] for p in pacs]))
    else:
        print("no active PACS")
    return EXIT_OK


def _health_text(p: dict[str, Any]) -> str:
    """'up', 'DOWN', 'unknown', or 'DOWN (when the daemon last ran)' for a finding that is no longer current."""
    if p["health"] == "unknown" or p["health_current"]:
        return p["health"]
    return f"{p['health']} (when the daemon last ran)"
