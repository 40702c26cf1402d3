"""The daemon: wires watchers, validation, delivery and scheduled jobs; handles signals and shutdown."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loguru import logger

from relaypacsd import auditing, recovery, retention, routing
from relaypacsd import reload as reloading
from relaypacsd.audit_syslog import AuditCounters
from relaypacsd.config import Config
from relaypacsd.delivery import Engine, Item
from relaypacsd.errors import ConfigError, JournalError
from relaypacsd.folders import EmptiedFolders
from relaypacsd.heartbeat import write_heartbeat
from relaypacsd.intake import VALIDATOR, Intake
from relaypacsd.jobs import Jobs
from relaypacsd.journal import journal_for
from relaypacsd.models import Sender
from relaypacsd.nodes import journal_shown, what_to_check
from relaypacsd.nodes_gateway import Gateway
from relaypacsd.scanning import Scanner
from relaypacsd.untracked import UntrackedScan
from relaypacsd.notify import Notifier
from relaypacsd.pauses import PauseFollower
from relaypacsd.senders import build_sender
from relaypacsd.snapshot import Folders, Snapshot, heartbeat_body, kept_folders, systemd_status, take
from relaypacsd.spool import Spool
from relaypacsd.validation import Validation
from relaypacsd.watcher import InboxWatcher

if TYPE_CHECKING:
    from relaypacsd.metrics import Metrics
    from relaypacsd.tally import Tally
    from relaypacsd.web.server import WebServer


class Daemon:
    """One running relaypacsd: the only long-lived mutable object in the process."""

    def __init__(self, config: Config, senders: dict[str, Sender] | None = None):
        self.counters = {"sent": 0, "failed": 0}
        self.started = time.monotonic()  # the snapshot's uptime
        self.ready = threading.Event()
        self.on_ready: Callable[[], None] | None = None
        self.notifier = Notifier()
        self.metrics: "Metrics | None" = None
        self.web: "WebServer | None" = None
        self.tally: "Tally | None" = None  # the kept folder counts: only while the dashboard runs
        self._senders = senders  # tests inject senders; a reload keeps them
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self._let_go_requested = threading.Event()
        self._wake = threading.Event()
        # Interrupted unpacks are finished once per watch root and process: at a reload, a validator of the
        # old generation may still be unpacking into its temp folder.
        self._unpacks_resumed: set[Path] = set()
        self.audit_counters = AuditCounters()  # across reloads, for the metrics
        self.audit = auditing.Auditor(config, self.audit_counters)  # lives across reloads (see reload)
        self._build(config)
        self.pauses = PauseFollower(self.state_dir)  # state_dir stays across reloads

    def _build(self, config: Config) -> None:
        """Create the running pieces (spools, watchers, journal, engine, scheduler) from `config`; start nothing."""
        senders = self._senders
        self.config = config
        self.state_dir = Path(config.daemon.state_dir)
        self.stop_event = threading.Event()  # stops this generation's threads (a reload makes a new one)
        self.spools = [Spool(Path(w.path)) for w in config.watch]
        # Each watcher sets its own event when a file may have completed: its scanner need not wait for scanning.TICK.
        self.watchers = [InboxWatcher(s.inbox, w, threading.Event()) for s, w in zip(self.spools, config.watch)]
        self._settle = {s.root: w.settle_seconds for s, w in zip(self.spools, config.watch)}
        try:
            self.journal = journal_for(config)
        except JournalError as exc:
            if config.journal.url:
                raise ConfigError(f"journal.url = {journal_shown(config)}: cannot use the journal ({exc}): "
                                  f"{what_to_check(config)}") from None
            raise ConfigError(f"daemon.state_dir = {str(self.state_dir)!r}: cannot keep the journal there ({exc}): "
                              "make the folder writable by the service user") from None
        if senders is None:
            active = config.active() if config.delivery.enabled else []
            senders = {p.name: build_sender(p) for p in active}
        self.engine = Engine(config, self.journal, senders, spools=self.spools, revalidate=self._queue_intake)
        self.engine.on_finished = self._on_finished
        self.engine.on_changed = self._on_changed
        self.gateway = Gateway(config, self.journal, self.spools, self.engine, self._request_let_go)
        if self.audit.enabled:
            self.engine.on_settled = lambda dest, settled: self.audit.settled(dest, settled)
        self.folders = EmptiedFolders(self._settle)  # removed at the next sweep once quiet
        self.deleted_failures = recovery.DeletedFailures(self.journal, self.spools)
        if self.metrics is not None:
            self.engine.on_batch = self.metrics.observe_batch
        self.validation = Validation(config, self.engine, self.counters, self._settle, self._queue_intake,
                                     self._may_be_empty)
        self._growing, self._grown = self.validation._growing, self.validation._grown  # tests look at them
        self.intake = Intake(lambda spool, path: self._validate(spool, path))
        self.intake.on_journal_error = self.gateway.node.journal_failed
        self._intake = self.intake.queue  # tests look at (and count) the queue itself
        self.untracked = UntrackedScan(self.spools, self.engine.known, self.journal.backlogged, self._queue_claimed,
                                       self.stop_event, self.validation.waiting, self.gateway.node.mine)
        self.untracked.on_journal_error = self.gateway.node.journal_failed
        self.scanners = [Scanner(s, w, self.stop_event, self._queue_claimed, self._may_be_empty, self.gateway.node)
                         for s, w in zip(self.spools, self.watchers)]
        self._threads: list[threading.Thread] = []
        self.jobs = Jobs()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare spools, recover sending/, start watchers, workers and jobs."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.gateway.start()  # joins; refuses a spool another node serves with another journal
        self._settle_spools()
        recovery.warn_if_nothing_forwards(self.config.delivery.enabled, bool(self.engine.destinations))
        if self.config.delivery.enabled:  # the routes, and their PACS that are not active (once per start)
            for level, line in routing.start_report(self.config.routes, self.engine.destinations):
                logger.log(level, line)
        if not self.audit.started:  # Application Start once per process, before any transfer
            self.audit.start()
        self.pauses.follow(self.engine.destinations, force=True)  # before any worker takes a batch
        if self.tally is not None:
            self.tally.count(self.spools, self.stop_event)
        self.engine.start()
        # Each generation's threads watch its own stop event: one that outlives a reload's wait must end, not
        # go on beside the new generation with the old settings.
        for name in range(self.intake.validators):
            self._spawn(lambda intake=self.intake, stop=self.stop_event: intake.run(stop), f"{VALIDATOR}{name}")
        self.deleted_failures.look()  # the first look (see there)
        self._housekeeping()
        self._spawn(self.untracked.run, "untracked")  # its first pass: what an earlier run left in sending/
        for scanner in self.scanners:
            scanner.initialize()
        for i, scanner in enumerate(self.scanners):
            self._spawn(scanner.run, f"scanner-{i}")
        # The health probe's first run is at once, in the scheduler: a PACS that hangs must not hold up
        # start-up (nor a reload, which watchdog pings do not cover here).
        self.jobs.start(self.config, self._sweep_job, self.engine.probe, self._heartbeat_job, self._retention_job)
        self.ready.set()
        self._write_heartbeat()
        logger.info("relaypacsd ready: {} watch root(s), forwarding to {}", len(self.spools),
                    ", ".join(f"{d.name} ({d.sender.target})" for d in self.engine.destinations.values()) or "nobody")
        if self.notifier.enabled:
            self.notifier.ready(self.status_line())
        if self.on_ready:
            self.on_ready()

    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT, reloading on SIGHUP; return the exit code."""
        self._install_signals()
        self._start_metrics()
        try:
            self._start_web()
            self.start()
            self._main_loop()
        finally:
            self.shutdown()
            if self.metrics is not None:
                self.metrics.stop_server()
            if self.web is not None:
                self.web.stop()
        return 0

    def _main_loop(self) -> None:
        """Until asked to stop: feed systemd's watchdog, reload on request, follow steps of the system clock."""
        tick = min(1.0, self.notifier.watchdog_interval or 1.0)
        clock = (time.time(), time.monotonic())
        while not self._stop_requested.is_set():
            # Only a daemon whose threads all run resets systemd's watchdog; else systemd restarts it.
            self._feed_watchdog(self.alive)
            self._wake.wait(tick)
            self._wake.clear()
            clock = self.jobs.follow_clock(clock)
            if self._reload_requested.is_set() and not self._stop_requested.is_set():
                self._reload_requested.clear()
                self.reload()
                clock = (time.time(), time.monotonic())
            if self._let_go_requested.is_set() and not self._stop_requested.is_set():
                self._let_go_requested.clear()
                self._restart(self.config)  # joins again, holding none of the files it lost
                clock = (time.time(), time.monotonic())

    def request_stop(self) -> None:
        """Ask the daemon to stop (safe from a signal handler: only sets flags)."""
        self._stop_requested.set()
        self.stop_event.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Ask the main loop to reload the config (safe from a signal handler: only sets flags)."""
        self._reload_requested.set()
        self._wake.set()

    def reload(self) -> bool:
        """Re-read the config file; if valid, restart the pieces with it, else keep running the old one.

        Files in flight stay in sending/ and the new pieces' recovery picks them up: nothing is lost.
        """
        self.notifier.reloading()
        source = self.config.source
        new = reloading.read_new_config(self.config)
        if new is None:
            self.audit.reload_refused()
            self.notifier.ready(self.status_line())
            return False
        old = self.config
        logger.info("reload of {}: stopping the pieces; files in flight stay in sending/", source)
        self._restart(new, lambda: setattr(self, "audit", auditing.follow(self.audit, old, new)))
        self.audit.config_reloaded(old, new)
        logger.info("reload of {} done", source)
        return True

    def _restart(self, config: Config, before_build: Callable[[], None] = lambda: None) -> None:
        """Stop this generation's pieces and start new ones with `config` (a reload; letting go of a lost lease).
        `before_build` runs once the old pieces stopped (the audit follows a reload there: the new engine reports to it)."""
        self.ready.clear()
        # Wait for every request in flight to end, however long its timeouts allow: a new engine started
        # beside one would send the same files again, and the old answer could no longer be recorded.
        waiting = reloading.WaitingForRequests(self._feed_watchdog, self._write_heartbeat, self._stop_requested,
                                               self.config.daemon.heartbeat_interval)
        self._stop_pieces(timeout=reloading.longest_request(self.config), give_up=waiting,
                          threads_timeout=reloading.UNPACK_WAIT)
        before_build()
        self._build(config)
        self.start()

    def _request_let_go(self) -> None:
        """This node lost its lease (relaypacsd.nodes): the main loop restarts the pieces with nothing held."""
        self._let_go_requested.set()
        self._wake.set()

    def _settle_spools(self) -> None:
        self.gateway.settle(self._unpacks_resumed, self._may_be_empty)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop claiming, let batches in flight finish, stop jobs; unfinished files stay in sending/."""
        logger.info("relaypacsd stopping: no new files are claimed; batches in flight finish")
        self.notifier.stopping()
        self._stop_requested.set()
        self._stop_pieces(timeout, leave=True)
        if self.tally is not None:
            self.tally.join()
        self.audit.stop()  # Application Stop, and up to 5 s for what the repository has not taken yet
        self._write_heartbeat(stopped=True)
        logger.info("relaypacsd stopped: {} sent, {} failed in this run", self.counters["sent"], self.counters["failed"])

    def _feed_watchdog(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Send systemd's WATCHDOG=1 when one is due and `alive()`."""
        self.notifier.feed_watchdog(alive)

    def _stop_pieces(self, timeout: float = 30.0, give_up: Callable[[], bool] = lambda: False,
                     threads_timeout: float = 5.0, leave: bool = False) -> None:
        """Stop watchers, jobs, workers and threads of this generation; unfinished files stay in sending/.
        `timeout` bounds the wait for requests in flight, `threads_timeout` the wait for a validation (or
        unpack) under way (other threads get 5 s: a scanner stuck on a hung share must not hold up a reload);
        give_up() ends both waits early."""
        self.stop_event.set()
        self.intake.shutdown()
        for scanner in self.scanners:
            scanner.shutdown()
        self.untracked.shutdown()
        self.jobs.shutdown()
        self.engine.stop(timeout=timeout, give_up=give_up)
        reloading.wait_for_threads(self._threads, threads_timeout, give_up)
        if leave:  # a stop, not a reload: other nodes may take this one's files at once
            self.gateway.stop()
        self.journal.close()

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.request_reload())

    def _start_metrics(self) -> None:
        """Serve Prometheus metrics on daemon.metrics_address:metrics_port (off when the port is 0)."""
        if not self.config.daemon.metrics_port:
            return
        from relaypacsd import metrics

        # A scrape walks each spool once.
        self.metrics = metrics.serve(self.config.daemon.metrics_address, self.config.daemon.metrics_port,
                                     lambda: self.snapshot(folders=True))
        self.engine.on_batch = self.metrics.observe_batch
        self.metrics.watch_audit(lambda: (self.audit_counters, self.audit.pending()))

    def _start_web(self) -> None:
        """Serve the dashboard on web.address:web.port (off when the port is 0); its counts are kept from now on."""
        if not self.config.web.port:
            return
        from relaypacsd.tally import Tally
        from relaypacsd.web.server import WebServer

        self.tally = Tally()
        self.web = WebServer(self, self.config.web)
        self.web.start()

    def snapshot(self, folders: bool = False, kept: bool = False) -> Snapshot:
        """This daemon's state now, for every reporter; `folders` walks each spool (a scrape's cost), `kept`
        gives the counts kept for the dashboard instead (no walk of sent/)."""
        return take(self.spools, self.engine, self.counters, self.ready.is_set(), self.alive, self.started,
                    folders=folders, kept=self._kept_folders if kept and self.tally is not None else None,
                    nodes=self.gateway.nodes)

    def _kept_folders(self) -> tuple[Folders, ...]:
        assert self.tally is not None
        held = self.engine.held_by_root()
        validating = self.intake.pending_paths() | set(self.validation._growing)
        return tuple(kept_folders(s, w.pending(), held, validating, self.tally) for s, w in zip(self.spools, self.watchers))

    def requeued(self, spool: Spool, path: Path) -> None:
        """An operator put a failed file back into sending/ (the dashboard): validate and send it now, not at
        the next sweep."""
        self._queue_intake(spool, path)

    def status_line(self) -> str:
        """One line for `systemctl status`: queue figures and PACS health."""
        return systemd_status(self.snapshot())

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def alive(self) -> bool:
        """True while the watchers, the scanner, the validators, the workers and the scheduler run."""
        return (all(w.alive() for w in self.watchers) and all(t.is_alive() for t in self._threads)
                and self.engine.alive() and self.jobs.running)

    # -- finding and validating files ------------------------------------------------------------------

    def _may_be_empty(self, spool: Spool, folder: Path, since: float | None = None) -> None:
        self.folders.mark(spool, folder, since)

    def _queue_intake(self, spool: Spool, path: Path) -> None:
        self.intake.put(spool, path)  # this generation's: a file an old one's validation queues goes to the new

    def _validate(self, spool: Spool, path: Path) -> None:
        self.validation.validate(spool, path)

    def _queue_claimed(self, spool: Spool, path: Path) -> None:
        # A scanner's or the untracked scan's: waits while the intake is full, so a huge inbox or sending/ is
        # taken in as fast as validation goes.
        self.intake.put(spool, path, stop=self.stop_event)

    def _recover(self) -> int:
        """The light housekeeping of each sweep, and one pass of the untracked scan now (tests; the daemon's
        own passes run on the "untracked" thread)."""
        self._housekeeping()
        return self.untracked.scan()

    def _housekeeping(self) -> None:
        """Emptied study folders; rows of deleted failures (hourly)."""
        self.folders.prune()
        self.deleted_failures.look_if_due()

    def _on_changed(self, item: Item, gone: bool) -> None:
        """The engine dropped a file that changed in sending/ after its validation: validate it again, or, gone,
        let its folder go."""
        if gone:
            self._may_be_empty(item.spool, item.path.parent)
        else:
            self._queue_intake(item.spool, item.path)

    def _on_finished(self, item: Item, folder: str) -> None:
        self.counters[folder] += 1
        if self.tally is not None and folder == "sent":
            self.tally.moved_to_sent(item.spool.root)
        if item.path.parent != item.spool.sending:
            self._may_be_empty(item.spool, item.path.parent)
        if item.path.exists():
            # A new file of the same name was claimed while this one was being moved out: validation
            # skipped it as already known; take it now rather than at the next sweep.
            self._queue_intake(item.spool, item.path)

    # -- scheduled jobs --------------------------------------------------------------------------------

    def _sweep_job(self) -> None:
        self.gateway.sweep(self._sweep, self._settle_spools)

    def _sweep(self) -> None:
        released = self.engine.sweep()
        self._housekeeping()
        if self.tally is not None:
            self.tally.count_if_due(self.spools, self.stop_event)
        self.untracked.request()  # files in sending/ without a task: found and logged by its thread
        if released:
            logger.info("retry sweep: {} file(s) due again", released)

    def _retention_job(self) -> None:
        if self.config.delivery.sent_retention_days > 0:
            removed = retention.remove_expired_sent(self.spools, self.config.delivery.sent_retention_days)
            if removed and self.tally is not None:
                self.tally.count(self.spools, self.stop_event)  # removed per root is not told: walk sent/ again
        retention.prune_history(self.journal, self.config.delivery.history_days, self.stop_event)

    def _heartbeat_job(self) -> None:
        self.gateway.beat()
        self.pauses.follow(self.engine.destinations)  # `relaypacsd pause` from another shell: one stat
        self._write_heartbeat()
        if self.notifier.enabled:
            self.notifier.status(self.status_line())

    def _write_heartbeat(self, stopped: bool = False) -> None:
        """Write the liveness file that `relaypacsd health` reads."""
        try:
            write_heartbeat(self.state_dir, heartbeat_body(self.snapshot(), os.getpid(), socket.gethostname(),
                                                           stopped=stopped))
        except OSError as exc:
            logger.warning("cannot write heartbeat in {}: {}", self.state_dir, exc)

