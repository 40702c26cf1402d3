"""This gateway as one node of several on a spool (issue #14): its lease, its files, and the journal's reach.

The folders are the truth: a file is claimed by a rename, and only one rename of a file can succeed. The
journal says who owns what: the node that claimed a file owns it while its lease lives (a heartbeat every
`heartbeat_interval`, a lease of `lease_seconds`). Each node's sweep takes only its own files; a node silent
past its lease is taken over (its files become the taker's, with the rows saying which PACS confirmed them,
so none gets a file twice) and fenced out: its journal writes fail (LeaseLost) and, once it beats again, it
learns it lost its lease and lets go (the daemon restarts its pieces). Moves out of sending/ wait while the
lease is not fresh, so a node paused past its lease does not move a file another node now owns.

While the journal is away, nothing is claimed (files wait in inbox/), no batch is sent, nothing is moved;
one log line says so, and another when it is back.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from loguru import logger

from relaypacsd.config import Config
from relaypacsd.errors import JournalBusy, JournalError, LeaseLost, NodeConflict
from relaypacsd.journal import Journal, NodeState

JOIN_TRIES = 5


def journal_shown(config: Config) -> str:
    """The journal as logs and messages name it (a password masked)."""
    if config.journal.url:
        from relaypacsd.pg_db import masked_url

        return masked_url(config.journal.url)
    return f"SQLite {Path(config.daemon.state_dir) / 'journal.sqlite3'}"


def what_to_check(config: Config) -> str:
    """What an operator checks when the journal cannot be reached."""
    if config.journal.url:
        return ("check that PostgreSQL runs and lets this host in (listen_addresses, pg_hba.conf, a firewall), "
                "and the password in journal.password_file")
    return f"check that {config.daemon.state_dir} is writable and its filesystem not full"


class Node:
    """This process's node: join, heartbeat and lease, takeover of silent nodes, and whether the journal is usable."""

    def __init__(self, config: Config, journal: Journal, clock: Callable[[], float] = time.monotonic):
        self.config, self.journal = config, journal
        self.name, self.host, self.pid = config.node, socket.gethostname(), os.getpid()
        self.lease = config.daemon.lease_seconds
        self.shared = bool(getattr(journal, "shared", False))
        # A file nobody owns (its claimer died between the rename and saying so) is anyone's after a lease;
        # alone on a spool (SQLite) nobody else can be claiming it.
        self.grace = self.lease if self.shared else 0.0
        self.epoch = 0
        self._clock = clock
        self._last_beat = clock()
        self._connected_since: float | None = clock()
        self._away_since: float | None = None
        self._usable = True
        self._change = threading.Condition()
        self.lost = threading.Event()  # set when this node learns another took its files over
        self.on_change: Callable[[bool], None] = lambda usable: None  # usable again / not: wake or hold workers
        self.on_lost: Callable[[], None] = lambda: None

    # -- joining and leaving -------------------------------------------------------------------------

    def join(self) -> int:
        """Register a new incarnation of this node, refusing a name another live process uses."""
        for _ in range(JOIN_TRIES):
            state = self.journal.node(self.name)
            if state is not None:
                self._refuse_if_in_use(state)
            epoch = self.journal.join(self.name, self.host, self.pid, state.epoch if state else 0)
            if epoch is not None:
                self.epoch = epoch
                self.journal.fence(self.name, epoch)
                self.lost.clear()
                self._beat_ok()
                return epoch
        raise NodeConflict(f"daemon.node = {self.name!r}: another process keeps joining under this name: give each "
                           "gateway its own daemon.node (or RELAYPACS_NODE)")

    def _refuse_if_in_use(self, state: NodeState) -> None:
        """Another live process holds this node name (on another host with a fresh heartbeat, or here, alive)."""
        if state.stopped or state.taken_by or (state.host == self.host and state.pid == self.pid):
            return
        here = state.host == self.host
        if here and not _process_alive(state.pid):
            return  # a crashed run of this node on this host: its files are ours again
        if not here and state.silent >= self.lease:
            return  # silent past its lease: presumed dead (and fenced out by this join)
        raise NodeConflict(f"daemon.node = {self.name!r} is in use by host {state.host} pid {state.pid} (heartbeat "
                           f"{state.silent:.0f} s ago): give each gateway on this spool its own daemon.node (or "
                           "RELAYPACS_NODE); see docs/gateways.md")

    def leave(self) -> None:
        """A clean stop: say goodbye so other nodes may take this node's files at once."""
        if self.epoch:
            try:
                self.journal.leave(self.name, self.epoch)
            except JournalError:
                pass  # away: the lease simply runs out

    # -- the lease -----------------------------------------------------------------------------------

    def beat(self, health: dict[str, Any]) -> None:
        """Renew the lease (the heartbeat job); learn here that it was lost, or that the journal is away/back."""
        try:
            held = self.journal.beat(self.name, self.epoch, health)
        except JournalError as exc:
            self.journal_failed(exc)
            return
        if not held:
            self._lose()
            return
        self._beat_ok()

    def _beat_ok(self) -> None:
        now = self._clock()
        self._last_beat = now
        if self._away_since is not None:
            logger.info("journal {} is reachable again after {:.0f} s: claiming and deliveries resume",
                        journal_shown(self.config), now - self._away_since)
            self._away_since = None
            self._connected_since = now
        self._update()

    def journal_failed(self, exc: JournalError) -> None:
        """Any part that hit a journal error reports it here: one log line per outage, and the pause."""
        if isinstance(exc, LeaseLost):
            self._lose()
            return
        if self._away_since is None:
            self._away_since = self._clock()
            self._connected_since = None
            logger.error("journal {} cannot be reached ({}): no new files are claimed (they wait in inbox/), deliveries "
                         "and moves wait in sending/ until it is back; {}", journal_shown(self.config),
                         _reason(exc), what_to_check(self.config))
        self._update()

    def _lose(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        state = None
        try:
            state = self.journal.node(self.name)
        except JournalError:
            pass
        by = f"node {state.taken_by}" if state is not None and state.taken_by else "another process of this name"
        logger.error("node {} lost its lease: it was presumed dead (silent for more than {:g} s) and {} took its "
                     "files over; letting go of every file this node held (a request still in flight may be sent "
                     "twice, which the PACS takes as a duplicate) and joining again", self.name, self.lease, by)
        self._update()
        self.on_lost()

    def usable(self) -> bool:
        """True while the journal answers and the lease is fresh: claims, sends and moves may go on."""
        usable = self._fresh()
        if not usable:
            self._usable = False  # seen stale by a worker: the next good beat wakes everyone (_update)
        return usable

    def _fresh(self) -> bool:
        return self._away_since is None and not self.lost.is_set() and self._clock() - self._last_beat < self.lease / 2

    def _update(self) -> None:
        usable = self._fresh()
        with self._change:
            changed, self._usable = usable != self._usable, usable
            self._change.notify_all()
        if changed:
            self.on_change(usable)

    def wait_usable(self, stop: threading.Event, step: float = 0.2) -> bool:
        """Block until usable (True), or until lost or `stop` (False): the finishing move waits here (stopping,
        it moves what it may at once, and waits for nothing)."""
        while not self.lost.is_set():
            if self.usable():
                return True
            if stop.is_set():
                return False
            with self._change:
                self._change.wait(step)
        return False

    # -- files ---------------------------------------------------------------------------------------

    def take_over(self) -> dict[str, int]:
        """Take over nodes silent past their lease (the sweep). Not in the first lease after the journal came
        back: every node's heartbeat then looks old, and the live ones must be given the time to beat."""
        if self._connected_since is None or (self.shared and self._clock() - self._connected_since < self.lease):
            return {}
        try:
            taken = self.journal.take_over(self.name, self.epoch, self.lease)
        except JournalBusy:
            return {}  # a silent node's transaction still holds its row: PostgreSQL ends it soon, the next sweep takes it
        for other, files in taken.items():
            if files:
                logger.warning("node {} was silent for more than {:g} s (or stopped): took over its {} file(s) in "
                               "sending/; a PACS that confirmed one never gets it again", other, self.lease, files)
        return taken

    def reserve(self, paths: list[Path]) -> set[Path] | None:
        """The inbox files this node may claim; None alone on the spool: all of them."""
        if not self.shared:
            return None  # not a set of them all: hashing every Path was a tenth of watching's CPU
        got = self.journal.reserve(self.name, self.epoch, [str(p) for p in paths], self.lease)
        return {p for p in paths if str(p) in got}

    def claimed(self, reserved: Iterable[Path], moved: list[Path]) -> None:
        """After the claims' renames: this node owns what it moved (alone: `ensure` records it)."""
        if self.shared:
            self.journal.claimed(self.name, [str(p) for p in reserved], [str(p) for p in moved])

    def mine(self, paths: list[Path]) -> list[Path]:
        """Of these untracked files in sending/, those this node owns, and those nobody owned for `grace`.
        Alone on the spool (SQLite), all of them. A name that is not UTF-8 is anyone's: validation renames it
        first, and of two nodes only one rename succeeds."""
        if not self.shared:
            return paths
        odd = [p for p in paths if not _utf8(str(p))]
        paths = [p for p in paths if _utf8(str(p))]
        owners = self.journal.owners([str(p) for p in paths])
        mine = [p for p in paths if owners.get(str(p)) == self.name]
        unowned = [str(p) for p in paths if str(p) not in owners]
        if unowned:
            adopted = set(self.journal.adopt(self.name, self.epoch, unowned, self.grace))
            mine += [p for p in paths if str(p) in adopted]
        return mine + odd

    def others(self, keys: list[str]) -> set[str]:
        """Of these journal paths, those another node owns (start-up repair leaves their rows alone)."""
        return {k for k, node in self.journal.owners(keys).items() if node != self.name}


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(exc: Exception) -> str:
    """The journal's error without the journal's name (the log line names it once)."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    return rest if sep and ("://" in head or head.startswith("/")) else text


def describe_nodes(states: list[NodeState], lease: float) -> list[dict[str, Any]]:
    """Every node as `status`, the metrics and the dashboard show it: name, host, last heartbeat, state, files
    it holds, and each PACS's health as that node sees it."""
    from relaypacsd.timefmt import iso_time

    out = []
    for n in states:
        if n.taken_by:
            state = f"taken over by {n.taken_by}"
        elif n.stopped:
            state = "stopped"
        elif n.silent >= lease:
            state = "silent"  # past its lease: the next sweep of a live node takes its files over
        else:
            state = "alive"
        out.append({"name": n.name, "host": n.host, "pid": n.pid, "state": state, "files": n.files,
                    "heartbeat": iso_time(n.heartbeat), "heartbeat_age_seconds": round(n.silent, 1),
                    "pacs": {d: {"healthy": bool(h.get("healthy")), "reason": str(h.get("reason", ""))}
                             for d, h in sorted(n.health.items()) if isinstance(h, dict)}})
    return out
