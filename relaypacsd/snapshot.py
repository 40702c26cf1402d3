"""One snapshot of the daemon's state, taken in one place and read by every reporter.

The Prometheus collector, the systemd STATUS line, the heartbeat file and (in another process) `status`
read these values rather than the daemon's pieces, so they never disagree on what a figure means. Taking
one reads each destination under its lock; walking the folders is optional, as it costs a walk of every
spool (the heartbeat and the STATUS line, written every few seconds, do without it).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from relaypacsd import __version__
from relaypacsd.spool import FOLDERS, Spool

if TYPE_CHECKING:  # typing only: delivery never imports this module
    from relaypacsd.delivery import Engine
    from relaypacsd.tally import Tally


@dataclass(frozen=True)
class Folders:
    """One watch root: files per folder and the age of the oldest file waiting in inbox/ or sending/."""

    root: str
    inbox: int
    sending: int
    sent: int | None  # None: not counted yet (the dashboard's kept counts, just after a start)
    failed: int
    oldest_waiting_seconds: float | None  # None: nothing waits

    def counts(self) -> dict[str, int | None]:
        """Files per folder, in the spool's order (inbox, sending, sent, failed)."""
        return {folder: getattr(self, folder) for folder in FOLDERS}

    def to_dict(self) -> dict[str, Any]:
        """The shape `status --json` prints per watch root (ages in whole seconds)."""
        age = self.oldest_waiting_seconds
        return {"root": self.root, **self.counts(), "oldest_waiting_seconds": None if age is None else round(age)}


@dataclass(frozen=True)
class DestinationState:
    """One active PACS as this run sees it."""

    name: str
    target: str
    healthy: bool
    down_reason: str  # "" while up
    queued: int  # files queued, waiting for a retry or in a request (in the backlog too)
    paused_by: str | None = None  # an operator's hold (relaypacsd.pauses)


@dataclass(frozen=True)
class Snapshot:
    """The daemon at one moment; `folders` is empty unless the walk (or the kept counts) was asked for."""

    time: float  # wall clock
    version: str
    uptime_seconds: float
    ready: bool  # started and not reloading
    alive: bool  # ready, and every watcher, worker and job thread runs
    in_flight: int
    sent: int  # files moved to sent/ in this run
    failed: int  # files moved to failed/ in this run
    roots: tuple[str, ...]
    destinations: tuple[DestinationState, ...]
    folders: tuple[Folders, ...] = ()
    backlog: int = 0  # of in_flight, files waiting in the journal's backlog, outside the engine's active window
    nodes: tuple[dict[str, Any], ...] = ()  # every gateway of the spool (nodes.describe_nodes), with the folders

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the dashboard's and the heartbeat's source)."""
        doc = asdict(self)
        doc["roots"] = list(self.roots)
        doc["destinations"] = [asdict(d) for d in self.destinations]
        doc["folders"] = [f.to_dict() for f in self.folders]
        doc["nodes"] = list(self.nodes)
        return doc


def folders_of(spool: Spool) -> Folders:
    """Walk one spool (every file once): its counts and its oldest waiting file's age."""
    counts, oldest = spool.stats()
    return Folders(root=str(spool.root), oldest_waiting_seconds=oldest, **{f: counts.get(f, 0) for f in FOLDERS})


def kept_folders(spool: Spool, inbox: int, held: Mapping[Path, tuple[int, float | None]],
                 validating: Iterable[Path], tally: "Tally") -> Folders:
    """One watch root from what the daemon holds (no walk of inbox/, sending/ or sent/; see tally.py).

    `inbox`: the watcher's candidates; `held`: the engine's files per root with the earliest first sighting
    (wall clock); `validating`: paths queued for validation or waiting to grow (they are in sending/ too)."""
    count, first_seen = held.get(spool.root, (0, None))
    prefix = os.path.join(spool.sending, "")
    sending = count + sum(1 for p in validating if os.fspath(p).startswith(prefix))
    oldest = None if first_seen is None else max(0.0, time.time() - first_seen)
    return Folders(root=str(spool.root), inbox=inbox, sending=sending, sent=tally.sent(spool.root),
                   failed=tally.failed(spool), oldest_waiting_seconds=oldest)


def take(spools: Iterable[Spool], engine: "Engine", counters: Mapping[str, int], ready: bool,
         alive: Callable[[], bool], started: float, folders: bool = False,
         kept: Callable[[], tuple[Folders, ...]] | None = None,
         nodes: Callable[[], tuple[dict[str, Any], ...]] = lambda: ()) -> Snapshot:
    """The state of one daemon from its pieces; `started` is its start in monotonic time.

    `alive` is only asked once ready: while a reload rebuilds the pieces, their threads are not a verdict.
    `folders` walks every spool; `kept` gives the counts the daemon keeps instead (the dashboard's)."""
    spools = list(spools)  # a reload may replace the list meanwhile: one list for the whole snapshot
    dests = tuple(DestinationState(name=name, target=d.sender.target, healthy=bool(d.healthy),
                                   down_reason=d.down_reason, queued=d.queued(),
                                   paused_by=getattr(d, "paused_by", None))  # test stand-ins have none
                  for name, d in list(engine.destinations.items()))
    return Snapshot(time=time.time(), version=__version__, uptime_seconds=max(0.0, time.monotonic() - started),
                    ready=ready, alive=ready and alive(), in_flight=engine.in_flight(),
                    sent=counters.get("sent", 0), failed=counters.get("failed", 0),
                    roots=tuple(str(s.root) for s in spools), destinations=dests,
                    folders=tuple(folders_of(s) for s in spools) if folders else (kept() if kept else ()),
                    backlog=engine.backlog(), nodes=nodes() if folders else ())


def systemd_status(snap: Snapshot) -> str:
    """One line for `systemctl status`: queue figures and PACS health."""
    pacs = ", ".join(f"{d.name} {'up' if d.healthy else 'DOWN'}{' (paused)' if d.paused_by is not None else ''}"
                     for d in snap.destinations)
    return (f"{len(snap.roots)} watch root(s); {snap.in_flight} file(s) in flight; "
            f"{snap.sent} sent, {snap.failed} failed; PACS: {pacs or 'none'}")


def heartbeat_body(snap: Snapshot, pid: int, host: str, stopped: bool = False) -> dict[str, Any]:
    """The liveness file's body. Not ready (a reload) still counts as alive: `health` must not fail it then."""
    return {"time": snap.time, "pid": pid, "host": host, "alive": (snap.alive or not snap.ready) and not stopped,
            "stopped": stopped, "in_flight": snap.in_flight, "sent": snap.sent, "failed": snap.failed}
