"""Node files in the spool itself: who serves each watch root, with which journal, under which name.

A gateway writes `<root>/.relaypacs/nodes/<node>.json` at start and at every heartbeat, and removes it at a
clean stop. A second gateway on the same spool finds it: with its own journal (SQLite, or another
database) it refuses to start, naming the node that serves the spool and how to run several (one shared
PostgreSQL journal); with the same journal but another name for the root, it refuses too (the journal keys
files by that name). No lock files: flock is not to be trusted on NFS. A node file is fresh while its time
lies within a lease of ours; the first one started wins when two start at once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaypacsd.errors import NodeConflict

MARKERS = Path(".relaypacs") / "nodes"


@dataclass(frozen=True)
class Marker:
    """What this node writes into each watch root it serves."""

    node: str
    host: str
    pid: int
    journal: str     # as shown (a password masked): "SQLite /var/lib/relaypacs/journal.sqlite3", "postgresql://..."
    journal_id: str  # the journal's identity: gateways of one spool share one journal
    shared: bool
    started: float   # wall clock
    root_name: str

    def body(self) -> dict[str, Any]:
        return {**self.__dict__, "time": time.time()}


def marker_path(root: Path, node: str) -> Path:
    """Where `node` says it serves `root`."""
    return root / MARKERS / f"{node}.json"


def write_marker(root: Path, marker: Marker) -> None:
    """Write (or refresh) this node's file in `root`, atomically (temp name, rename)."""
    path = marker_path(root, marker.node)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{marker.node}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(marker.body()))
    os.replace(tmp, path)


def remove_marker(root: Path, node: str) -> None:
    """A clean stop: this node no longer serves `root`."""
    try:
        marker_path(root, node).unlink()
    except OSError:
        pass


def others(root: Path, me: str, lease: float, now: float | None = None) -> list[dict[str, Any]]:
    """Fresh node files of other nodes in `root` (time within `lease` of ours)."""
    now = time.time() if now is None else now
    found = []
    try:
        names = sorted(os.listdir(root / MARKERS))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith(".") or name[:-5] == me:
            continue
        try:
            body = json.loads((root / MARKERS / name).read_text())
            age = now - float(body["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if abs(age) < lease:
            found.append({**body, "age": max(0.0, age)})
    return found


def check_spool(root: Path, mine: Marker, lease: float) -> None:
    """Refuse (NodeConflict, one line) to serve `root` beside a node with another journal or another name for it.

    Called after writing our own file: of two nodes starting at once, the one started later refuses."""
    for other in others(root, mine.node, lease):
        if (float(other.get("started", 0)), str(other.get("node"))) > (mine.started, mine.node):
            continue  # it started after us: it refuses, not we
        who = (f"node {other.get('node')} (host {other.get('host')}, pid {other.get('pid')}, heartbeat "
               f"{other['age']:.0f} s ago)")
        if other.get("journal_id") != mine.journal_id or not mine.shared:
            raise NodeConflict(
                f"watch root {root} is served by {who} with its own journal ({other.get('journal')}): several gateways "
                "on one spool need ONE shared PostgreSQL journal: set the same [journal] url = \"postgresql://...\" on "
                "every one of them (docs/gateways.md), or stop that node first")
        if other.get("root_name") != mine.root_name:
            raise NodeConflict(
                f"watch root {root} is named {mine.root_name!r} here but {who} names it {other.get('root_name')!r}: the "
                "journal keys files by that name: give this [[watch]] the same name = \"...\" on every gateway")
