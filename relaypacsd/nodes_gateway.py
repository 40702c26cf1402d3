"""The daemon's part as one node of several: its Node wired into the engine, the finisher and the intake, its
files in the spool's node folder, and the jobs' share (heartbeat, takeover). The daemon holds one per generation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from loguru import logger

from relaypacsd import nodes_spool, recovery
from relaypacsd.config import Config
from relaypacsd.delivery import Engine
from relaypacsd.errors import JournalError
from relaypacsd.journal import Journal
from relaypacsd.nodes import Node, describe_nodes, journal_shown
from relaypacsd.spool import Spool


# When this process started serving (wall clock): of two nodes starting at once the later one refuses, and a
# reload must not make this one "later" than a newcomer (nodes_spool.check_spool).
PROCESS_STARTED = time.time()


class Gateway:
    """This node in one generation of the daemon's pieces."""

    def __init__(self, config: Config, journal: Journal, spools: list[Spool], engine: Engine,
                 on_lost: Callable[[], None]):
        self.config, self.journal, self.spools, self.engine = config, journal, spools, engine
        self.node = Node(config, journal)
        self.node.on_change = lambda usable: engine.wake_all() if usable else None
        self.node.on_lost = on_lost
        engine.may_send = self.node.usable
        engine.on_journal_error = self.node.journal_failed
        engine.finisher.on_journal_error = self.node.journal_failed
        engine.window.on_journal_error = self.node.journal_failed  # the refill's take from the backlog
        engine.finisher.may_move = lambda: self.node.wait_usable(engine.stop_event)
        self.started = PROCESS_STARTED
        self._marker_trouble = False

    @property
    def quiet_for(self) -> float:
        """How long a leftover in the spool stays untouched before start-up repair may take it as a crash's."""
        return max(60.0, self.config.daemon.lease_seconds) if self.node.shared else 0.0

    def start(self) -> None:
        """Join (a new incarnation), then say in every watch root that this node serves it, refusing a spool that
        another node serves with another journal (NodeConflict)."""
        self.node.join()
        marker = self._marker()
        for spool, watch in zip(self.spools, self.config.watch):
            spool.prepare()
            nodes_spool.write_marker(spool.root, marker(watch.name))
            try:
                nodes_spool.check_spool(spool.root, marker(watch.name), self.config.daemon.lease_seconds)
            except Exception:
                nodes_spool.remove_marker(spool.root, self.node.name)
                raise
        logger.info("node {} (host {}, epoch {}) with journal {}; lease {:g} s", self.node.name, self.node.host,
                    self.node.epoch, journal_shown(self.config), self.config.daemon.lease_seconds)

    def _marker(self) -> Callable[[str], nodes_spool.Marker]:
        identity, shown = self.journal.identity, journal_shown(self.config)
        return lambda name: nodes_spool.Marker(node=self.node.name, host=self.node.host, pid=self.node.pid,
                                               journal=shown, journal_id=identity, shared=self.node.shared,
                                               started=self.started, root_name=name)

    def beat(self) -> None:
        """The heartbeat job's part: renew the lease with this node's view of each PACS; refresh the node files."""
        health = {name: {"healthy": bool(d.healthy), "reason": d.down_reason}
                  for name, d in list(self.engine.destinations.items())}
        self.node.beat(health)
        if not self.node.epoch:
            return
        try:
            marker = self._marker()
        except JournalError:
            return
        for spool, watch in zip(self.spools, self.config.watch):
            try:
                nodes_spool.write_marker(spool.root, marker(watch.name))
                self._marker_trouble = False
            except OSError as exc:
                if not self._marker_trouble:
                    logger.warning("cannot write this node's file in {}: {}", spool.root / nodes_spool.MARKERS, exc)
                self._marker_trouble = True

    def settle(self, unpacks_resumed: set[Path], may_be_empty: Callable[[Spool, Path, float], None]) -> None:
        """Start-up repair of the spools and the journal: with several gateways, only this node's part (rows of
        files another node owns, leftovers younger than `quiet_for`, are that node's business)."""
        others = self.node.others if self.node.shared else (lambda keys: set())
        recovery.prepare_spools(self.spools, self.journal, unpacks_resumed, may_be_empty, others, self.quiet_for)

    def sweep(self, work: Callable[[], None], settle: Callable[[], None]) -> None:
        """The retry sweep, while the journal answers and the lease is fresh: first take over silent nodes
        (settling the rows their death left behind), then `work` (the sweep itself)."""
        if not self.node.usable():
            return  # nothing is taken up, nothing expires
        try:
            if any(self.node.take_over().values()):
                settle()
            work()
        except JournalError as exc:
            self.node.journal_failed(exc)

    def nodes(self) -> tuple[dict, ...]:
        """Every node of the spool with its files and its view of each PACS (a scrape's look at the journal)."""
        try:
            return tuple(describe_nodes(self.journal.nodes(), self.config.daemon.lease_seconds))
        except JournalError:
            return ()

    def stop(self) -> None:
        """A clean stop: goodbye in the journal, and the node files go."""
        self.node.leave()
        for spool in self.spools:
            nodes_spool.remove_marker(spool.root, self.node.name)

