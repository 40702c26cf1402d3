"""Folder counts the dashboard reads many times a minute, kept rather than recounted.

sent/ grows to hundreds of thousands of files: it is walked once in the background (at start, then hourly to
follow files people deleted), and between walks the daemon's own moves keep the figure (+1 per file it moves
there, minus what retention removed). inbox/ and sending/ are what the daemon holds in memory (the watcher's
candidates, the intake and the engine): no walk at all. failed/ is small and changes by hand (retries from
another shell, deletions): it is counted by a walk of its own, at most every FAILED_TTL seconds.

Only the dashboard reads these (`Daemon.snapshot(kept=True)`): without it no thread is started and nothing is
counted, so the daemon's cost per file stays where it was.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterable

from loguru import logger

from relaypacsd.sidecars import SIDECAR_SUFFIX
from relaypacsd.spool import Spool

RECOUNT_INTERVAL = 3600.0  # seconds between walks of sent/ (files deleted by hand show within this)
FAILED_TTL = 5.0  # seconds a count of failed/ is reused


def count_files(folder: Path, stop: threading.Event | None = None) -> int:
    """Regular files below `folder` as `Spool.files` counts them (sidecars and temp files excluded), by
    names only: no stat per file. Stops early (returning what it has) when `stop` is set."""
    n = 0
    for _dirpath, _dirnames, filenames in os.walk(folder):
        if stop is not None and stop.is_set():
            break
        n += sum(1 for f in filenames if not f.endswith(SIDECAR_SUFFIX) and not f.startswith(".relaypacs-"))
    return n


class Tally:
    """Per watch root: files in sent/ (walked, then kept) and in failed/ (walked, cached). Thread-safe."""

    def __init__(self, recount_interval: float = RECOUNT_INTERVAL):
        self.recount_interval = recount_interval
        self._lock = threading.Lock()
        self._sent: dict[Path, int] = {}
        self._during: dict[Path, int] = {}  # moves made while a walk of that root runs
        self._failed: dict[Path, tuple[float, int]] = {}
        self._thread: threading.Thread | None = None
        self._next = 0.0

    def count(self, spools: Iterable[Spool], stop: threading.Event) -> None:
        """Walk each root's sent/ in a thread of its own ("tally") unless a walk runs already."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._next = time.monotonic() + self.recount_interval
        self._thread = threading.Thread(target=self._walk, args=(list(spools), stop), name="tally", daemon=True)
        self._thread.start()

    def count_if_due(self, spools: Iterable[Spool], stop: threading.Event) -> None:
        """The hourly walk, at a sweep."""
        if time.monotonic() >= self._next:
            self.count(spools, stop)

    def _walk(self, spools: list[Spool], stop: threading.Event) -> None:
        started = time.monotonic()
        for spool in spools:
            with self._lock:
                self._during[spool.root] = 0
            n = count_files(spool.sent, stop)
            if stop.is_set():
                return
            with self._lock:
                # A move during the walk may or may not have been seen by it: counted once more here, the
                # figure is off by those few files until the next walk, never by a whole folder.
                self._sent[spool.root] = n + self._during.pop(spool.root, 0)
        logger.debug("tally: sent/ of {} watch root(s) counted in {:.2f} s", len(spools), time.monotonic() - started)

    def moved_to_sent(self, root: Path, n: int = 1) -> None:
        """The daemon moved `n` files into (or, negative, removed them from) `root`/sent/."""
        with self._lock:
            if root in self._during:
                self._during[root] += n
            elif root in self._sent:
                self._sent[root] = max(0, self._sent[root] + n)

    def sent(self, root: Path) -> int | None:
        """Files in sent/, or None until the first walk of that root has ended."""
        with self._lock:
            return self._sent.get(root)

    def failed(self, spool: Spool) -> int:
        """Files in failed/, walked at most every FAILED_TTL seconds."""
        now = time.monotonic()
        with self._lock:
            cached = self._failed.get(spool.root)
        if cached is not None and now - cached[0] < FAILED_TTL:
            return cached[1]
        n = count_files(spool.failed)
        with self._lock:
            self._failed[spool.root] = (now, n)
        return n

    def failed_seen(self, spool: Spool, n: int) -> None:
        """A full listing of failed/ (the failed files page) found `n` files: the count is fresh."""
        with self._lock:
            self._failed[spool.root] = (time.monotonic(), n)

    def forget_failed(self) -> None:
        """The next look at failed/ walks it (after a retry from the dashboard)."""
        with self._lock:
            self._failed.clear()

    def join(self, timeout: float = 5.0) -> None:
        """Wait for a walk under way (it ends soon once the daemon's stop event is set)."""
        if self._thread is not None:
            self._thread.join(timeout)
