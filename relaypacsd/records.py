"""An answer in the journal's and the log's words: the Update each instance's fate becomes at one PACS (with its
error line), and the log lines of one send attempt. fate.py decides; this only says it."""

from __future__ import annotations

import time
from collections.abc import Iterable

from loguru import logger

from relaypacsd.batches import backoff, describe
from relaypacsd.config import DeliveryConfig
from relaypacsd.fate import Fate, FailReason, Verdict
from relaypacsd.journal import Update
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.queues import Item


def update_for(dest: str, item: Item, result: InstanceResult, fate: Fate,
               cfg: DeliveryConfig) -> tuple[Update, float | None]:
    """The journal update for one instance's fate at `dest`, and its backoff delay in seconds when it waits
    (None when it settled: delivered or failed)."""
    key, attempts, detail = str(item.path), fate.attempts, describe(result)
    if fate.verdict is Verdict.DELIVERED:
        return Update(key, dest, "delivered", result.outcome.value, detail, attempts, code=result.reason_code,
                      sop=item.info.sop_instance_uid, digest=item.info.digest), None
    if fate.reason is FailReason.UID_CONFLICT:
        logger.error("PACS forward {} UID conflict: {} uid={}{}: {}", dest, item.spool.relative(item.path),
                     item.info.sop_instance_uid, _routes([item]), result.reason)
        return Update(key, dest, "failed", result.outcome.value, detail, attempts, code=result.reason_code), None
    if fate.verdict is Verdict.FAILED:
        if fate.reason is FailReason.TOO_OLD:
            detail = f"gave up after {cfg.max_age_hours:g} h of retries; last error: {detail}"
        logger.error("PACS forward {} failed: {} uid={}{}: {}", dest, item.spool.relative(item.path),
                     item.info.sop_instance_uid, _routes([item]), detail)
        return Update(key, dest, "failed", "failed", detail, attempts, code=result.reason_code), None
    delay = backoff(cfg.retry_delay, attempts, cfg.retry_backoff_max)
    return Update(key, dest, "waiting", result.outcome.value, detail, attempts, next_try=time.time() + delay,
                  code=result.reason_code), delay


def log_attempt(dest: str, items: list[Item], results: list[InstanceResult], status: int | None, ms: float,
                attempt: int) -> None:
    """Log one request to `dest`: a line per outcome, naming its files and UIDs."""
    by_outcome: dict[Outcome, list[tuple[Item, InstanceResult]]] = {}
    for item, result in zip(items, results):
        by_outcome.setdefault(result.outcome, []).append((item, result))
    http = f"HTTP {status}" if status is not None else "no answer"
    for outcome, pairs in by_outcome.items():
        files = ",".join(str(i.spool.relative(i.path)) for i, _ in pairs)
        uids = ",".join(i.info.sop_instance_uid for i, _ in pairs)
        reason = pairs[0][1].reason
        routes = _routes(i for i, _ in pairs)
        if outcome.delivered:
            logger.info("PACS forward {} {}: {} file(s) in {:.0f} ms ({}) files={} uids={}{}", dest,
                        outcome.value, len(pairs), ms, http, files, uids, routes)
        else:
            logger.warning("PACS forward {} {}: {} file(s) not delivered (attempt {}, {} ms, {}): {} files={} "
                           "uids={}{}", dest, outcome.value, len(pairs), attempt, round(ms), http, reason, files, uids,
                           routes)


def _routes(items: Iterable[Item]) -> str:
    """' routes=mammo,default' naming the routes of these files (each once), '' when none is routed."""
    names = dict.fromkeys(r for i in items if i.route for r in i.route.split(","))
    return f" routes={','.join(names)}" if names else ""
