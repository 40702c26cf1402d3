"""Emptied study folders: remembered when a claim or a move may empty them, removed at a sweep once quiet."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from relaypacsd.spool import Spool

# An emptied study folder goes once untouched this long (or the settle time, if longer): a writer pausing
# between the files of a study (a slow C-STORE link into inbox/) must not find its folder gone (ENOENT).
FOLDER_QUIET = 60.0


class EmptiedFolders:
    """Folders a claim or a move out of sending/ may have emptied, each with since when (monotonic): their
    mtime alone would make one emptied just now look old after the clock steps forward."""

    def __init__(self, settle: dict[Path, float]):
        self._settle = settle  # watch root -> its settle time
        # (watch root, folder) as text -> (its spool, the folder, since when). Text: a mark runs twice per file,
        # and a (Spool, Path) key hashed and compared the dataclass and the Path's parts each time (5 us a mark).
        self._since: dict[tuple[str, str], tuple[Spool, Path, float]] = {}
        self._lock = threading.Lock()

    def mark(self, spool: Spool, folder: Path, since: float | None = None) -> None:
        """Remember that `folder` may be empty since `since` (now if None); the latest time wins."""
        since = time.monotonic() if since is None else since
        key = (os.fspath(spool.root), os.fspath(folder))
        with self._lock:
            known = self._since.get(key)
            if known is None or known[2] < since:
                self._since[key] = (spool, folder, since)

    def marked(self, spool: Spool, folder: Path) -> bool:
        """Whether `folder` is remembered as maybe emptied (until a prune removes or keeps it)."""
        with self._lock:
            return (os.fspath(spool.root), os.fspath(folder)) in self._since

    def prune(self) -> None:
        """Remove the study folders that claims and moves emptied, once untouched for FOLDER_QUIET: a writer
        that has just made a folder, or paused between its files, is about to put a file there."""
        with self._lock:
            candidates, self._since = self._since, {}
        now = time.monotonic()
        for spool, folder, since in candidates.values():
            if now - since < self._quiet(spool):
                self.mark(spool, folder, since)  # emptied by this run too recently, whatever its mtime
                continue
            removed = spool.prune(folder, self._quiet(spool))
            left = folder.parents[removed - 1] if removed else folder  # where it stopped
            try:
                if spool.relative(left) != Path(".") and not os.listdir(left):
                    self.mark(spool, left)  # empty but changed just now: look again at the next sweep
            except OSError:  # gone, or not a folder: nothing to do
                pass

    def _quiet(self, spool: Spool) -> float:
        return max(FOLDER_QUIET, self._settle.get(spool.root, 2.0))
