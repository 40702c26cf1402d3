"""Retention: files in sent/ removed once older than `sent_retention_days` (when set)."""

from __future__ import annotations

import time
from typing import Iterable

from loguru import logger

from relaypacsd import fate
from relaypacsd.spool import Spool, age_seconds


def remove_expired_sent(spools: Iterable[Spool], days: float) -> int:
    """Remove the files in each spool's sent/ that have been there longer than `days`; return how many went."""
    now = time.time()  # wall time: the file's arrival in sent/ may lie before this run
    removed = 0
    for spool in spools:
        for path in spool.files("sent"):
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
