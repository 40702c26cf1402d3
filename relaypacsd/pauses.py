"""Paused PACS: an operator's hold on one destination, kept in the state directory so it outlives a restart.

A paused PACS takes no new batches; its files wait in sending/ (they do not expire while it is paused: the
hold was asked for) and go when it is resumed. The file `paused.json` is the one truth: `relaypacsd pause`
(another process) and the dashboard (in the daemon) both write it, and the daemon follows it at each heartbeat.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from loguru import logger

from relaypacsd.errors import JournalError, PauseError
from relaypacsd.history import PAUSED, RESUMED, HistoryRecord
from relaypacsd.timefmt import iso_time

if TYPE_CHECKING:
    from relaypacsd.journal import Journal

PAUSED_FILE = "paused.json"


def paused_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / PAUSED_FILE


def read_paused(state_dir: str | Path) -> dict[str, dict[str, Any]]:
    """PACS name -> {"by": who, "since": ISO time}; empty when nothing is paused or the file is unreadable."""
    try:
        doc = json.loads(paused_path(state_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in doc.items() if isinstance(v, dict)} if isinstance(doc, dict) else {}


def stamp(state_dir: str | Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of the file, or None: one stat tells the daemon whether to read it again."""
    try:
        st = os.stat(paused_path(state_dir))
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def set_paused(state_dir: str | Path, name: str, paused: bool, by: str,
               journal: "Journal | None" = None) -> dict[str, dict[str, Any]]:
    """Pause or resume `name` in the file (locked, written atomically); PauseError when it is so already.
    With a journal, the act lands in the delivery history with who did it."""
    current = _write(state_dir, name, paused, by)
    if journal is not None:
        # After the file: the hold is in force whether or not the journal takes the record.
        try:
            journal.record_history([HistoryRecord(time=time.time(), destination=name, user=by,
                                                  outcome=PAUSED if paused else RESUMED)])
        except JournalError as exc:
            logger.warning("{} {} by {}: not recorded in the history ({})", "paused" if paused else "resumed",
                           name, by, exc)
    return current


def _write(state_dir: str | Path, name: str, paused: bool, by: str) -> dict[str, dict[str, Any]]:
    try:
        with _locked(Path(state_dir)):
            current = read_paused(state_dir)
            if paused == (name in current):
                raise PauseError(f"PACS {name!r} is {'already paused' if paused else 'not paused'}"
                                 + (f" (by {current[name].get('by') or 'someone'} since {current[name].get('since')})"
                                    if paused else ""))
            if paused:
                current[name] = {"by": by, "since": iso_time(time.time())}
            else:
                del current[name]
            tmp = paused_path(state_dir).with_name(f".{PAUSED_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, paused_path(state_dir))
            return current
    except OSError as exc:
        raise PauseError(f"cannot write {paused_path(state_dir)} ({exc.strerror}): run as the service user") from None


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One writer at a time (the CLI and the dashboard may both write)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f".{PAUSED_FILE}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class PauseFollower:
    """The daemon's side: applies the file's pauses to the engine's destinations when the file changes."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = state_dir
        self._stamp: tuple[int, int] | None = None
        self.paused: dict[str, dict[str, Any]] = {}

    def follow(self, destinations: dict[str, Any], force: bool = False) -> None:
        """Read the file again if it changed (one stat otherwise) and set each destination's pause."""
        now = stamp(self.state_dir)
        if not force and now == self._stamp:
            return
        self._stamp = now
        self.paused = read_paused(self.state_dir)
        for name, dest in list(destinations.items()):
            info = self.paused.get(name)
            dest.set_paused(info is not None, (info or {}).get("by", ""))
