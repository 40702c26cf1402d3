"""Files in sending/ that nothing tracks, found and queued for validation: neither held in the engine's window
nor waiting in the journal's backlog (left by a crash, put back by `relaypacsd retry`, a validation that
failed, a truncated file waiting its grace).

A thread of its own makes a pass when asked (at start-up, then at each retry sweep): it walks sending/ one
entry at a time, looks each 500 files up in the journal at once, and queues the untracked ones as fast as
validation takes them. With a million files waiting a pass takes seconds (minutes when they all need
validating), so the next one waits PACE times as long as the last one took, at most MAX_PAUSE: scanning and
the validation it causes take a twentieth of the time at most, and a few files of a normal day's sending/
are looked at every sweep as before.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from loguru import logger

from relaypacsd.errors import JournalError
from relaypacsd.spool import Spool

CHUNK = 500  # files looked up in the journal at once
PACE = 19.0  # a pass waits this many times as long as the last one took
MAX_PAUSE = 3600.0  # seconds: at most this long between two passes that are asked for


class UntrackedScan:
    """One generation's scan of sending/ (huey's BaseProcess shape: `scan` is one pass, `run` repeats it)."""

    def __init__(self, spools: list[Spool], known: Callable[[Path], bool],
                 backlogged: Callable[[Iterable[str]], set[str]], queue: Callable[[Spool, Path], None],
                 stop: threading.Event, growing: Callable[[], int] = lambda: 0,
                 mine: Callable[[list[Path]], list[Path]] = lambda paths: paths):
        self.spools, self.stop = spools, stop
        self._known = known  # held in the engine's window
        self._backlogged = backlogged  # waiting in the journal's backlog
        self._queue = queue  # to validation (waits while the intake is full)
        self._growing = growing  # truncated files waiting their grace: found at every pass, not news
        # Of the untracked, those this node owns (nodes.Node.mine): with several gateways on the spool another
        # node's files are its own to send (the 70 s outage bug: each node sent all 200); a dead one's, taken over.
        self._mine = mine
        self.on_journal_error: Callable[[JournalError], None] | None = None  # the node's (see window.Window)
        self._asked = threading.Event()
        self._asked.set()  # the first pass at once: files an earlier run left in sending/
        self.passes = 0

    def request(self) -> None:
        """Ask for a pass (a retry sweep): it starts once the last one's pace allows."""
        self._asked.set()

    def shutdown(self) -> None:
        """Wake the thread so it sees this generation's stop."""
        self._asked.set()

    def run(self) -> None:
        """Make a pass whenever asked, paced; until this generation's stop."""
        next_at = 0.0
        while not self.stop.is_set():
            self._asked.wait()
            if self.stop.wait(max(0.0, next_at - time.monotonic())):
                return
            self._asked.clear()
            started = time.monotonic()
            try:
                found = self.scan()
            except JournalError as exc:
                if self.on_journal_error is None:
                    logger.error("looking for untracked files in sending/ failed ({}); the next retry sweep looks "
                                 "again", exc)
                else:
                    self.on_journal_error(exc)  # one line per outage; the next sweep asks again
                found = 0
            except Exception:  # a bug: the next sweep asks again
                logger.exception("looking for untracked files in sending/ failed; the next retry sweep looks again")
                found = 0
            # Wall time, waits for validation included: they are the work this pass caused.
            took = time.monotonic() - started
            next_at = time.monotonic() + min(MAX_PAUSE, PACE * took)
            self.passes += 1
            if self.passes == 1 and found:
                logger.info("recovered {} file(s) left in sending/ by the previous run", found)
            elif found - self._growing() > 0:
                logger.info("found {} file(s) in sending/ without a task: validating them", found - self._growing())

    def scan(self) -> int:
        """One pass over every spool's sending/: queue the files nothing tracks; return how many."""
        found = 0
        for spool in self.spools:
            chunk: list[Path] = []
            for path in spool.walk("sending"):
                if self.stop.is_set():
                    return found
                if not self._known(path):
                    chunk.append(path)
                if len(chunk) >= CHUNK:
                    found += self._queue_untracked(spool, chunk)
                    chunk = []
            found += self._queue_untracked(spool, chunk)
        return found

    def _queue_untracked(self, spool: Spool, paths: list[Path]) -> int:
        if not paths:
            return 0
        # A name that is not valid UTF-8 has no rows (validation renames it first): never asked about.
        waiting = self._backlogged([str(p) for p in paths if _utf8(str(p))])
        count = 0
        for path in self._mine([p for p in paths if str(p) not in waiting]):
            # Known again: the refill took it from the backlog between the two looks.
            if not self._known(path) and not self.stop.is_set():
                self._queue(spool, path)
                count += 1
        return count


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
