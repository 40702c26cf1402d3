"""Retention: files in sent/ removed once older than `sent_retention_days` (when set); the delivery history's
records once older than `history_days`, in small steps."""

from __future__ import annotations

import threading
import time
from typing import Iterable

from loguru import logger

from relaypacsd import fate
from relaypacsd.errors import JournalError
from relaypacsd.journal import Journal
from relaypacsd.spool import Spool, age_seconds

HISTORY_PRUNE_STEP = 500  # records per commit: a few ms of the journal's lock, so delivery never waits long
HISTORY_PRUNE_PAUSE = 0.05  # seconds between two steps: the workers' commits go in between
HISTORY_PRUNE_BUDGET = 60.0  # seconds per run at most; what is left goes at the next run (hourly)


def remove_expired_sent(spools: Iterable[Spool], days: float) -> int:
    """Remove the files in each spool's sent/ that have been there longer than `days`; return how many went."""
    now = time.time()  # wall time: the file's arrival in sent/ may lie before this run
    removed = 0
    for spool in spools:
        for path in spool.walk("sent"):  # a million files in sent/ cost no list of them
            age = age_seconds(path, now)  # since it arrived in sent/, not its mtime (cp -p keeps that)
            try:
                if fate.retention_over(age, days):
                    path.unlink()
                    removed += 1
            except OSError:
                continue
    if removed:
        logger.info("retention: removed {} file(s) from sent/ older than {:g} days", removed, days)
    return removed


def prune_history(journal: Journal, days: float, stop: threading.Event, *, step: int = HISTORY_PRUNE_STEP,
                  pause: float = HISTORY_PRUNE_PAUSE, budget: float = HISTORY_PRUNE_BUDGET) -> int:
    """Drop the history records older than `days` (0: all), `step` at a time with a pause between steps, until
    none is left, `budget` seconds have passed or `stop` is set; return how many went."""
    before = time.time() - days * 86400
    deadline = time.monotonic() + budget
    removed = 0
    try:
        while not stop.is_set():
            went = journal.prune_history(before, step)
            removed += went
            if went < step or time.monotonic() >= deadline or stop.wait(pause):
                break
    except JournalError as exc:  # the journal closed under a stopping daemon, or a disk error: the next run tries
        logger.warning("retention: pruning the delivery history stopped: {}", exc)
    if removed:
        logger.info("retention: removed {} delivery history record(s) older than {:g} days", removed, days)
    return removed
