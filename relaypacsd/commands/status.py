"""`status`: folders, ages, PACS health; safe while the daemon runs (`retry` is in commands/retry.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Mapping

from relaypacsd.commands.common import EXIT_OK, human_age, load, print_json, table
from relaypacsd.commands.common import short as _short
from relaypacsd.config import Config
from relaypacsd.errors import ConfigError, JournalError
from relaypacsd.heartbeat import process_gone, read_heartbeat
from relaypacsd.journal import DestinationStats, journal_for
from relaypacsd.nodes import describe_nodes
from relaypacsd.pauses import read_paused
from relaypacsd.snapshot import folders_of
from relaypacsd.spool import Spool
from relaypacsd.timefmt import iso_time


def _read_journal(config: Config) -> tuple[dict[str, DestinationStats], dict[str, dict[str, int]], dict[str, int],
                                          list[dict[str, Any]]]:
    """Destinations with their counters, per-state counts, files waiting per route and the spool's nodes (#14),
    read-only (safe while daemons write); from [journal] url when set, else SQLite in state_dir."""
    try:
        journal = journal_for(config, readonly=True)
    except (JournalError, ConfigError):
        return {}, {}, {}, []
    try:
        try:
            nodes = describe_nodes(journal.nodes(), config.daemon.lease_seconds)
        except JournalError:  # a journal no daemon of this version has opened yet
            nodes = []
        return journal.destinations(), journal.counts(), journal.route_counts(), nodes
    except JournalError:
        return {}, {}, {}, []
    finally:
        journal.close()


def daemon_state(state_dir: Path) -> dict[str, Any]:
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


def pacs_entries(config: Config, dests: Mapping[str, DestinationStats], counts: Mapping[str, Mapping[str, int]],
                 running: bool, paused: Mapping[str, Mapping[str, Any]], now: float) -> list[dict[str, Any]]:
    """Each active PACS as `status --json` shows it (the dashboard's /api/status shows the same)."""
    pacs = []
    for p in config.active():
        d: Mapping[str, Any] = dests.get(p.name) or {}  # no row yet: never heard of
        healthy = d.get("healthy")
        health = "unknown" if healthy is None else ("up" if healthy else "DOWN")
        hold = paused.get(p.name)
        # The daemon resets health to unknown at start, so while it runs a row is this run's finding; once
        # it stopped, what it last found is shown as such, never as current.
        pacs.append({"name": p.name, "target": p.stow_base, "health": health,
                     "health_current": running and healthy is not None,
                     "health_since": iso_time(d.get("last_change")),
                     "last_error": d.get("last_error") or "", "last_success": iso_time(d.get("last_success")),
                     "last_success_age_seconds": round(now - d["last_success"]) if d.get("last_success") else None,
                     "delivered": d.get("delivered", 0), "failed": d.get("failed", 0),
                     "uid_conflicts": d.get("conflicts", 0),
                     "waiting": counts.get(p.name, {}).get("waiting", 0) + counts.get(p.name, {}).get("pending", 0),
                     "paused": hold is not None, "paused_by": (hold or {}).get("by"),
                     "paused_since": (hold or {}).get("since")})
    return pacs


def cmd_status(args: argparse.Namespace) -> int:
    """Folder counts, oldest waiting file, each PACS's health, last error and last success."""
    config = load(args)
    state_dir = Path(config.daemon.state_dir)
    roots = [folders_of(Spool(Path(w.path))).to_dict() for w in config.watch]  # as the daemon counts
    dests, counts, by_route, nodes = _read_journal(config)
    daemon = daemon_state(state_dir)
    now = time.time()
    pacs = pacs_entries(config, dests, counts, bool(daemon["running"]), read_paused(state_dir), now)
    active = set(config.delivery.active_pacs) if config.delivery.enabled else set()
    routes = [{"name": r.name, "match": r.describe(), "to": list(r.to), "continue": r.go_on,
               "inactive": [d for d in r.to if d not in active],
               # files in sending/ that some PACS still owes, given by this route (alone or with others)
               "waiting": sum(n for names, n in by_route.items() if r.name in names.split(","))}
              for r in config.routes]
    if args.json:
        print_json({"daemon": daemon, "watch": roots, "pacs": pacs, "routes": routes, "nodes": nodes})
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
    if routes:
        print()
        print(table(["route", "match", "to", "waiting"],
                    [[r["name"] + (" (continue)" if r["continue"] else ""), _short(r["match"], 60),
                      ", ".join(d + (" (not active)" if d in r["inactive"] else "") for d in r["to"]), r["waiting"]]
                     for r in routes]))
    if nodes:
        print()
        names = sorted({d for n in nodes for d in n["pacs"]})
        print(table(["node", "host", "state", "last heartbeat", "files held", *(f"{d} (as it sees it)" for d in names)],
                    [[n["name"], n["host"], n["state"], human_age(round(n["heartbeat_age_seconds"])) + " ago", n["files"],
                      *(_node_health(n, d) for d in names)] for n in nodes]))
    return EXIT_OK


def _node_health(node: dict[str, Any], dest: str) -> str:
    health = node["pacs"].get(dest)
    if health is None:
        return "-"
    return "up" if health["healthy"] else f"DOWN: {_short(health['reason'], 40)}"


def _health_text(p: dict[str, Any]) -> str:
    """'up', 'DOWN', 'unknown', or 'DOWN (when the daemon last ran)' for a finding that is no longer current."""
    paused = f", PAUSED by {p['paused_by'] or 'an operator'}" if p.get("paused") else ""
    if p["health"] == "unknown" or p["health_current"]:
        return p["health"] + paused
    return f"{p['health']} (when the daemon last ran){paused}"
