"""The daemon: conducts one generation of running pieces (generation.py) at a time: start, reload, let go of a
lost lease, shutdown; signals, systemd, the metrics and web servers, the snapshot and the heartbeat."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loguru import logger

from relaypacsd import auditing, dicomfile
from relaypacsd import reload as reloading
from relaypacsd.audit_syslog import AuditCounters
from relaypacsd.config import Config
from relaypacsd.generation import Generation
from relaypacsd.heartbeat import write_heartbeat
from relaypacsd.models import Sender
from relaypacsd.notify import Notifier
from relaypacsd.pauses import PauseFollower
from relaypacsd.snapshot import Folders, Snapshot, heartbeat_body, kept_folders, systemd_status, take
from relaypacsd.spool import Spool

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
        """Create the running pieces from `config` (a new Generation); start nothing."""
        self.config = config
        self.state_dir = Path(config.daemon.state_dir)
        self.pieces = g = Generation(config, self._senders, self.counters, self.audit, self.metrics,
                                     lambda: self.tally, self._request_let_go, lambda: self.pieces)
        # The pieces under the names the reporters, the web view and the tests use.
        self.stop_event, self.spools, self.watchers, self.journal = g.stop_event, g.spools, g.watchers, g.journal
        self.engine, self.gateway, self.folders, self.deleted_failures = g.engine, g.gateway, g.folders, g.deleted_failures
        self.validation, self.intake, self.untracked, self.scanners = g.validation, g.intake, g.untracked, g.scanners
        self._threads, self.jobs, self._intake = g.threads, g.jobs, g.intake.queue
        self._growing, self._grown = g.validation._growing, g.validation._grown
        self._validate, self._queue_intake, self._may_be_empty = g.validation.validate, g.queue_intake, g.may_be_empty
        self._on_finished, self._recover, self._retention_job = g.on_finished, g.recover, g.retention_job

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare spools, recover sending/, start watchers, workers and jobs."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pieces.start(self.audit, self.pauses, self._unpacks_resumed, self._heartbeat_job)
        self.ready.set()
        self._write_heartbeat()
        logger.info("relaypacsd ready: {} watch root(s), forwarding to {}", len(self.spools),
                    ", ".join(f"{d.name} ({d.sender.target})" for d in self.engine.destinations.values()) or "nobody")
        if not dicomfile.C_WALK:
            logger.warning("validation walks each file in Python: relaypacsd/_elementwalk (the walk in C) was not "
                           "built at install; install gcc and python3-dev, then reinstall relaypacsd (about 0.1 ms "
                           "less CPU per file)")
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
        """Stop this generation (Generation.stop); unfinished files stay in sending/."""
        self.pieces.stop(timeout, give_up, threads_timeout, leave)

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
        held = self.engine.holder.held_by_root()
        validating = self.intake.pending_paths() | set(self.validation._growing)
        return tuple(kept_folders(s, w.pending(), held, validating, self.tally) for s, w in zip(self.spools, self.watchers))

    def requeued(self, spool: Spool, path: Path) -> None:
        """An operator put a failed file back into sending/ (the dashboard): validate and send it now, not at
        the next sweep."""
        self._queue_intake(spool, path)

    def status_line(self) -> str:
        """One line for `systemctl status`: queue figures and PACS health."""
        return systemd_status(self.snapshot())

    def alive(self) -> bool:
        """True while every piece of this generation runs."""
        return self.pieces.alive()

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

