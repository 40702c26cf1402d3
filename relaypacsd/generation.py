"""One config's running pieces (spools, watchers, journal, engine, validators, scanners, scheduled jobs), built,
started and stopped together, and the callbacks between them. A reload, or a lost lease, replaces the generation."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loguru import logger

from relaypacsd import auditing, recovery, retention, routing
from relaypacsd import reload as reloading
from relaypacsd.config import Config
from relaypacsd.delivery import Engine, Item
from relaypacsd.errors import ConfigError, JournalError
from relaypacsd.folders import EmptiedFolders
from relaypacsd.intake import VALIDATOR, Intake
from relaypacsd.jobs import Job, Jobs
from relaypacsd.journal import journal_for
from relaypacsd.models import Sender
from relaypacsd.nodes import journal_shown, what_to_check
from relaypacsd.nodes_gateway import Gateway
from relaypacsd.pauses import PauseFollower
from relaypacsd.scanning import Scanner
from relaypacsd.senders import build_sender
from relaypacsd.spool import Spool
from relaypacsd.untracked import UntrackedScan
from relaypacsd.validation import Valid, Validation
from relaypacsd.watcher import InboxWatcher

if TYPE_CHECKING:
    from relaypacsd.metrics import Metrics
    from relaypacsd.tally import Tally


class Generation:
    """The pieces one config runs; the daemon conducts them (start, stop, replace) and reports on them."""

    def __init__(self, config: Config, senders: dict[str, Sender] | None, counters: dict[str, int],
                 audit: auditing.Auditor, metrics: "Metrics | None", tally: Callable[[], "Tally | None"],
                 request_let_go: Callable[[], None], current: Callable[[], "Generation"] | None = None):
        """Create every piece from `config`; start nothing. `counters` (sent, failed) and the tally (the
        dashboard's kept counts, or None) belong to the daemon and outlive the generation; `current()` is the
        daemon's newest generation."""
        self.config = config
        self.counters = counters
        self._tally = tally
        # A thread that outlived a reload's wait (a long unpack, a scanner on a hung share) hands its files and
        # emptied folders to the newest generation: this one's intake and sweeps have stopped.
        self._current = current or (lambda: self)
        self.stop_event = threading.Event()  # stops this generation's threads
        self.spools = [Spool(Path(w.path)) for w in config.watch]
        # Each watcher sets its own event when a file may have completed: its scanner need not wait for scanning.TICK.
        self.watchers = [InboxWatcher(s.inbox, w, threading.Event()) for s, w in zip(self.spools, config.watch)]
        self.settle = {s.root: w.settle_seconds for s, w in zip(self.spools, config.watch)}
        try:
            self.journal = journal_for(config)
        except JournalError as exc:
            if config.journal.url:
                raise ConfigError(f"journal.url = {journal_shown(config)}: cannot use the journal ({exc}): "
                                  f"{what_to_check(config)}") from None
            raise ConfigError(f"daemon.state_dir = {str(Path(config.daemon.state_dir))!r}: cannot keep the journal there "
                              f"({exc}): make the folder writable by the service user") from None
        if senders is None:
            active = config.active() if config.delivery.enabled else []
            senders = {p.name: build_sender(p) for p in active}
        self.engine = Engine(config, self.journal, senders, spools=self.spools, revalidate=self.queue_intake)
        self.engine.on_finished = self.on_finished
        self.engine.on_changed = self.on_changed
        self.gateway = Gateway(config, self.journal, self.spools, self.engine, request_let_go)
        if audit.enabled:
            self.engine.on_settled = audit.settled
        if metrics is not None:
            self.engine.on_batch = metrics.observe_batch
        self.folders = EmptiedFolders(self.settle)  # removed at the next sweep once quiet
        self.deleted_failures = recovery.DeletedFailures(self.journal, self.spools)
        self.validation = Validation(config, self.engine, counters, self.settle, self.queue_intake, self.may_be_empty)
        self.intake: Intake[Valid] = Intake(lambda spool, path: self._current().validation.check(spool, path),
                                            submit=lambda valid: self._current().validation.submit(valid))
        self.intake.on_journal_error = self.gateway.node.journal_failed
        self.untracked = UntrackedScan(self.spools, self.engine.known, self.journal.backlogged, self.queue_claimed,
                                       self.stop_event, self.validation.waiting, self.gateway.node.mine)
        self.untracked.on_journal_error = self.gateway.node.journal_failed
        self.scanners = [Scanner(s, w, self.stop_event, self.queue_claimed, self.may_be_empty, self.gateway.node)
                         for s, w in zip(self.spools, self.watchers)]
        self.threads: list[threading.Thread] = []
        self.jobs = Jobs()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, audit: auditing.Auditor, pauses: PauseFollower, unpacks_resumed: set[Path],
              heartbeat: Job) -> None:
        """Join the spool, recover sending/, start the engine, validators, scanners and jobs (`heartbeat` is the
        daemon's job). Interrupted unpacks are finished once per root and process (`unpacks_resumed`)."""
        self._unpacks_resumed = unpacks_resumed
        self.gateway.start()  # joins; refuses a spool another node serves with another journal
        self.settle_spools()
        recovery.warn_if_nothing_forwards(self.config.delivery.enabled, bool(self.engine.destinations))
        if self.config.delivery.enabled:  # the routes, and their PACS that are not active (once per start)
            for level, line in routing.start_report(self.config.routes, self.engine.destinations):
                logger.log(level, line)
        if not audit.started:  # Application Start once per process, before any transfer
            audit.start()
        pauses.follow(self.engine.destinations, force=True)  # before any worker takes a batch
        tally = self._tally()
        if tally is not None:
            tally.count(self.spools, self.stop_event)
        self.engine.start()
        # Each generation's threads watch its own stop event: one that outlives a reload's wait must end, not
        # go on beside the new generation with the old settings.
        for name in range(self.intake.validators):
            self._spawn(lambda: self.intake.run(self.stop_event), f"{VALIDATOR}{name}")
        self.deleted_failures.look()  # the first look (see there)
        self.housekeeping()
        self._spawn(self.untracked.run, "untracked")  # its first pass: what an earlier run left in sending/
        for scanner in self.scanners:
            scanner.initialize()
        for i, scanner in enumerate(self.scanners):
            self._spawn(scanner.run, f"scanner-{i}")
        # The health probe's first run is at once, in the scheduler: a PACS that hangs must not hold up
        # start-up (nor a reload, which watchdog pings do not cover here).
        self.jobs.start(self.config, self.sweep_job, self.engine.probe, heartbeat, self.retention_job)

    def stop(self, timeout: float = 30.0, give_up: Callable[[], bool] = lambda: False,
             threads_timeout: float = 5.0, leave: bool = False) -> None:
        """Stop watchers, jobs, workers and threads; unfinished files stay in sending/. `timeout` bounds the wait
        for requests in flight, `threads_timeout` the wait for a validation (or unpack) under way (other threads
        get 5 s: a scanner stuck on a hung share must not hold up a reload); give_up() ends both waits early.
        `leave`: a stop, not a reload: the node leaves the spool and other nodes may take its files at once."""
        self.stop_event.set()
        self.intake.shutdown()
        for scanner in self.scanners:
            scanner.shutdown()
        self.untracked.shutdown()
        self.jobs.shutdown()
        self.engine.stop(timeout=timeout, give_up=give_up)
        reloading.wait_for_threads(self.threads, threads_timeout, give_up)
        if leave:
            self.gateway.stop()
        self.journal.close()

    def alive(self) -> bool:
        """True while the watchers, the scanners, the validators, the workers and the scheduler run."""
        return (all(w.alive() for w in self.watchers) and all(t.is_alive() for t in self.threads)
                and self.engine.alive() and self.jobs.running)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def settle_spools(self) -> None:
        """Repair each spool after a crash (gateway.settle): at start and, with several nodes, at each sweep."""
        self.gateway.settle(self._unpacks_resumed, self.may_be_empty)

    # -- between the pieces ------------------------------------------------------------------------

    def may_be_empty(self, spool: Spool, folder: Path, since: float | None = None) -> None:
        self._current().folders.mark(spool, folder, since)

    def queue_intake(self, spool: Spool, path: Path) -> None:
        self._current().intake.put(spool, path)

    def queue_claimed(self, spool: Spool, path: Path) -> None:
        # A scanner's or the untracked scan's: waits while the intake is full, so a huge inbox or sending/ is
        # taken in as fast as validation goes.
        current = self._current()
        current.intake.put(spool, path, stop=current.stop_event)

    def on_changed(self, item: Item, gone: bool) -> None:
        """The engine dropped a file that changed in sending/ after its validation: validate it again, or, gone,
        let its folder go."""
        if gone:
            self.may_be_empty(item.spool, item.path.parent)
        else:
            self.queue_intake(item.spool, item.path)

    def on_finished(self, item: Item, folder: str) -> None:
        """A file reached sent/ or failed/: count it, let its study folder go, take a new file of its name."""
        self.counters[folder] += 1
        tally = self._tally()
        if tally is not None and folder == "sent":
            tally.moved_to_sent(item.spool.root)
        if os.path.dirname(item.path) != item.spool.sending_text:  # as text: this runs for every file
            self.may_be_empty(item.spool, item.path.parent)
        if item.path.exists():
            # A new file of the same name was claimed while this one was being moved out: validation
            # skipped it as already known; take it now rather than at the next sweep.
            self.queue_intake(item.spool, item.path)

    # -- scheduled jobs ----------------------------------------------------------------------------

    def recover(self) -> int:
        """The light housekeeping of each sweep, and one pass of the untracked scan now (tests; the daemon's
        own passes run on the "untracked" thread)."""
        self.housekeeping()
        return self.untracked.scan()

    def housekeeping(self) -> None:
        """Emptied study folders; rows of deleted failures (hourly)."""
        self.folders.prune()
        self.deleted_failures.look_if_due()

    def sweep_job(self) -> None:
        self.gateway.sweep(self._sweep, self.settle_spools)

    def _sweep(self) -> None:
        released = self.engine.sweep()
        self.housekeeping()
        tally = self._tally()
        if tally is not None:
            tally.count_if_due(self.spools, self.stop_event)
        self.untracked.request()  # files in sending/ without a task: found and logged by its thread
        if released:
            logger.info("retry sweep: {} file(s) due again", released)

    def retention_job(self) -> None:
        """Hourly: sent/ files past sent_retention_days, and history past history_days."""
        if self.config.delivery.sent_retention_days > 0:
            removed = retention.remove_expired_sent(self.spools, self.config.delivery.sent_retention_days)
            tally = self._tally()
            if removed and tally is not None:
                tally.count(self.spools, self.stop_event)  # removed per root is not told: walk sent/ again
        retention.prune_history(self.journal, self.config.delivery.history_days, self.stop_event)
