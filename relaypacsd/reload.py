"""A reload (SIGHUP): the new config read and checked, and the waits while the old generation stops."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Callable

from loguru import logger

from relaypacsd.config import Config, load_config
from relaypacsd.errors import RelayPacsError
from relaypacsd.intake import VALIDATOR
from relaypacsd.spool import Spool

UNPACK_WAIT = 600.0  # seconds a reload waits for a zip being unpacked (a new unpack beside it is wasted work)
RESTART_ONLY = ("log_level", "log_format", "log_file", "metrics_port", "metrics_address", "state_dir")


def read_new_config(current: Config) -> Config | None:
    """Re-read `current`'s file; None (logged) if it is unusable, so that the running configuration stays."""
    source = current.source
    try:
        new = load_config(None if source in ("", "(no file)") else source)
        if not new.watch:
            raise RelayPacsError(f"{new.source}: no [[watch]] table")
        for w in new.watch:
            Spool(Path(w.path)).prepare()
    except Exception as exc:  # any problem: one line, and the running configuration stays
        logger.error("reload of {} refused, still running the previous configuration: {}", source, exc)
        return None
    for key in RESTART_ONLY:
        if getattr(new.daemon, key) != getattr(current.daemon, key):
            logger.warning("reload: daemon.{} changed; it takes effect at the next restart", key)
    # The journal stays where it is: a new one elsewhere would forget which PACS confirmed what (and an
    # unusable folder would end the daemon after its pieces had stopped, not refuse the reload).
    # So do the journal, this node's name and the watch roots' names (its keys): changed, they need a restart.
    if new.journal != current.journal or new.node != current.node or \
            [w.name for w in new.watch] != [w.name for w in current.watch][:len(new.watch)]:
        logger.warning("reload: [journal], daemon.node or a [[watch]] name changed; that takes effect at the next "
                       "restart (the files this node holds are keyed by them)")
    names = {w.path: w.name for w in current.watch}
    watch = tuple(dataclasses.replace(w, name=names.get(w.path, w.name)) for w in new.watch)
    return dataclasses.replace(new, journal=current.journal, watch=watch,
                               daemon=dataclasses.replace(new.daemon, state_dir=current.daemon.state_dir,
                                                          node=current.daemon.node))


def longest_request(config: Config) -> float:
    """How long one request may take by its PACS's timeouts (a slow upload, then a slow answer)."""
    return max([30.0] + [2 * (p.connect_timeout + p.read_timeout) + 10 for p in config.active()])


class WaitingForRequests:
    """The give_up() of a reload's waits for requests in flight and unpacks: keeps systemd's watchdog and the
    heartbeat fed meanwhile; a stop request (SIGTERM) ends the wait."""

    def __init__(self, feed_watchdog: Callable[[], None], write_heartbeat: Callable[[], None],
                 stop_requested: threading.Event, heartbeat_interval: float):
        self._feed_watchdog, self._write_heartbeat = feed_watchdog, write_heartbeat
        self._stop_requested, self._interval = stop_requested, heartbeat_interval
        self._next_beat = 0.0

    def __call__(self) -> bool:
        self._feed_watchdog()  # the threads are stopping on purpose: alive() would say no
        now = time.monotonic()
        if now >= self._next_beat:  # and `relaypacsd health` (Docker's HEALTHCHECK) too: the heartbeat stays fresh
            self._write_heartbeat()
            self._next_beat = now + self._interval
        return self._stop_requested.is_set()


def wait_for_threads(threads: list[threading.Thread], timeout: float, give_up: Callable[[], bool]) -> None:
    """Wait for a generation's threads to end: validators (an unpack under way) up to `timeout`, the others
    5 s at most (a scanner stuck on a hung share must not hold up a reload); give_up() ends the wait early."""
    started = time.monotonic()
    for t in threads:
        limit = timeout if t.name.startswith(VALIDATOR) else min(timeout, 5.0)
        while t.is_alive() and time.monotonic() < started + limit and not give_up():
            t.join(0.2)
