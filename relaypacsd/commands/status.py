"""`status` (folders, ages, PACS health; safe while the daemon runs) and `retry` (failed/ back to sending/)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

from relaypacsd.commands.common import EXIT_FAIL, EXIT_OK, UsageError, human_age, load, print_json, table
from relaypacsd.heartbeat import process_gone
from relaypacsd.errors import JournalError
from relaypacsd.journal import DestinationStats, Journal, open_journal
from relaypacsd.snapshot import folders_of
from relaypacsd.spool import Spool, clashed, read_sidecar, sidecar_path
from relaypacsd.timefmt import iso_time


def _read_journal(state_dir: Path) -> tuple[dict[str, DestinationStats], dict[str, dict[str, int]]]:
    """Destinations with their counters and per-state counts, read-only (safe while the daemon writes)."""
    try:
        journal = open_journal(state_dir, readonly=True)
    except JournalError:
        return {}, {}
    try:
        return journal.destinations(), journal.counts()
    except JournalError:
        return {}, {}
    finally:
        journal.close()


def _daemon_state(state_dir: Path) -> dict[str, Any]:
    try:
        beat = json.loads((state_dir / "heartbeat.json").read_text())
        age = time.time() - float(beat.get("time", 0))
        running = age < 60 and not beat.get("stopped") and not process_gone(beat)  # as `health` judges it
        return {"running": running, "heartbeat_age_seconds": round(age), "pid": beat.get("pid"),
                "in_flight": beat.get("in_flight")}
    except (OSError, ValueError):
        return {"running": False, "heartbeat_age_seconds": None, "pid": None, "in_flight": None}


def cmd_status(args: argparse.Namespace) -> int:
    """Folder counts, oldest waiting file, each PACS's health, last error and last success."""
    config = load(args)
    state_dir = Path(config.daemon.state_dir)
    roots = [folders_of(Spool(Path(w.path))).to_dict() for w in config.watch]  # as the daemon counts
    dests, counts = _read_journal(state_dir)
    daemon = _daemon_state(state_dir)
    now = time.time()
    pacs = []
    for p in config.active():
        d: Mapping[str, Any] = dests.get(p.name) or {}  # no row yet: never heard of
        healthy = d.get("healthy")
        health = "unknown" if healthy is None else ("up" if healthy else "DOWN")
        # The daemon resets health to unknown at start, so while it runs a row is this run's finding; once
        # it stopped, what it last found is shown as such, never as current.
        pacs.append({"name": p.name, "target": p.stow_base, "health": health,
                     "health_current": bool(daemon["running"]) and healthy is not None,
                     "health_since": iso_time(d.get("last_change")),
                     "last_error": d.get("last_error") or "", "last_success": iso_time(d.get("last_success")),
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


def _short(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# -- retry -----------------------------------------------------------------------------------------


def _spool_of(path: Path, spools: list[Spool]) -> tuple[Spool, Path]:
    """The watch root whose failed/ holds `path`, and the path spelled as the daemon spells it (journal key)."""
    for spool in spools:
        try:
            rel = path.relative_to(spool.failed.absolute())
        except ValueError:
            continue
        return spool, spool.failed / rel
    roots = ", ".join(str(s.failed) for s in spools) or "none configured"
    raise UsageError(f"{path}: not inside a failed/ folder of a watch root ({roots}): only failed files can be retried")


def _requeue_with_rows(spool: Spool, journal: Journal, path: Path) -> tuple[Path, list[str]]:
    """Move a failed file back to sending/ with its journal rows; return its new path and the PACS reset.

    Once the file is in sending/, a running daemon may take it at once and must find 'delivered' rows there
    for the PACS that have it, or it sends the file to them again. So the rows are copied first, to a name
    that holds neither a file nor rows, the file moves to exactly that name (another name gets its own copy
    first), and only then do its rows in failed/ go. Killed anywhere, the file keeps its rows; at worst a
    copy is left under a name with no file, which start-up drops.

    The copy carries a token of this retry: when the name turns out taken, only the copy is taken back, never
    rows the daemon wrote there meanwhile for a file it claimed under that name."""
    key = str(path)
    reset = journal.reset_failed(key)
    wanted = spool.sending / spool.relative(path)
    token = secrets.token_hex(8)
    n = 0
    while True:
        target = wanted if n == 0 else clashed(wanted, n)
        n += 1
        if os.path.lexists(target) or not journal.copy(key, str(target), token):
            continue
        try:
            spool.move_to(path, target)
        except FileExistsError:  # taken between the look and the move (the daemon claimed a file)
            journal.uncopy(str(target), token)
            continue
        except OSError:
            journal.uncopy(str(target), token)  # the file stayed in failed/, with its rows
            raise
        break
    journal.forget(key)
    try:
        sidecar_path(path).unlink(missing_ok=True)
    except OSError as exc:  # the file is back in sending/ with its rows: only the old reason stays behind
        print(f"warn could not remove {sidecar_path(path)} ({exc.strerror}): delete it by hand")
    return target, reset


def cmd_retry(args: argparse.Namespace) -> int:
    """Move failed files back to sending/ and reset their 'failed' journal rows to 'pending'."""
    config = load(args)
    spools = [Spool(Path(w.path)) for w in config.watch]
    if not args.all and not args.files:
        raise UsageError("name the failed files to retry, or pass --all")
    todo: list[tuple[Spool, Path]] = []
    if args.all:
        for spool in spools:
            if spool.failed.is_dir():
                todo += [(spool, p) for p in spool.files("failed")]
    for raw in args.files or []:
        path = Path(raw).absolute()
        if path.name.endswith(".error.json"):
            path = path.with_name(path.name[: -len(".error.json")])
        if not path.is_file():
            raise UsageError(f"{raw}: no such file")
        todo.append(_spool_of(path, spools))
    if not todo:
        print("nothing to retry: no file in failed/")
        return EXIT_OK
    state_dir = Path(config.daemon.state_dir)
    journal = open_journal(state_dir) if state_dir.is_dir() else None
    errors = 0
    try:
        for spool, path in todo:
            reason = (read_sidecar(path) or {}).get("reason", "")
            reset: list[str] = []
            try:
                if journal is None:
                    new = spool.requeue(path)
                else:
                    new, reset = _requeue_with_rows(spool, journal, path)
            except OSError as exc:
                errors += 1
                print(f"FAIL {path}: cannot move it back to sending/ ({exc})")
                continue
            again = f" for {', '.join(reset)}" if reset else ""
            print(f"queued {spool.relative(new)} in {spool.sending}{again} (was: {_short(reason, 80) or 'no reason recorded'})")
    finally:
        if journal is not None:
            journal.close()
    print(f"{len(todo) - errors} file(s) back in sending/: the running daemon sends them at its next retry sweep")
    return EXIT_FAIL if errors else EXIT_OK
