"""An answer in the journal's and the log's words: the Update each instance's fate becomes at one PACS (with its
error line), and the log lines of one send attempt. fate.py decides; this only says it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from loguru import logger

from relaypacsd import history
from relaypacsd.batches import backoff, describe
from relaypacsd.config import DeliveryConfig
from relaypacsd.fate import Fate, FailReason, Verdict
from relaypacsd.journal import Update
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.queues import Item

# A failed fate's reason in the delivery history's words
_FAILED_OUTCOMES = {FailReason.UID_CONFLICT: history.UID_CONFLICT, FailReason.PERMANENT: history.FAILED,
                    FailReason.TOO_OLD: history.TOO_OLD, FailReason.LIMITED: history.RETRIES_EXHAUSTED}


def update_for(dest: str, item: Item, result: InstanceResult, fate: Fate, cfg: DeliveryConfig, *,
               attempt: int = 0, duration_ms: float | None = None) -> tuple[Update, float | None]:
    """The journal update for one instance's fate at `dest` (with its history record, unless history is off:
    the `attempt`-th delivery there, its request `duration_ms` long), and its backoff delay in seconds when it
    waits (None when it settled: delivered or failed)."""
    key, attempts, detail = str(item.path), fate.attempts, describe(result)
    state, event, delay = Verdict.FAILED.value, result.outcome.value, None
    extra: dict[str, Any] = {}
    if fate.verdict is Verdict.DELIVERED:
        state = Verdict.DELIVERED.value
        extra = {"sop": item.info.sop_instance_uid, "digest": item.info.digest}
    elif fate.reason is FailReason.UID_CONFLICT:
        logger.error("PACS forward {} UID conflict: {} uid={}{}: {}", dest, item.spool.relative(item.path),
                     item.info.sop_instance_uid, _routes([item]), result.reason)
    elif fate.verdict is Verdict.FAILED:
        if fate.reason is FailReason.TOO_OLD:
            detail = f"gave up after {cfg.max_age_hours:g} h of retries; last error: {detail}"
        logger.error("PACS forward {} failed: {} uid={}{}: {}", dest, item.spool.relative(item.path),
                     item.info.sop_instance_uid, _routes([item]), detail)
        event = "failed"
    else:
        delay = backoff(cfg.retry_delay, attempts, cfg.retry_backoff_max)
        state, extra = Verdict.WAIT.value, {"next_try": time.time() + delay}
    record = _record(dest, item, result, fate, cfg, detail, attempt, duration_ms)
    return Update(key, dest, state, event, detail, attempts, code=result.reason_code, record=record, **extra), delay


def _record(dest: str, item: Item, result: InstanceResult, fate: Fate, cfg: DeliveryConfig, detail: str,
            attempt: int, duration_ms: float | None) -> history.HistoryRecord | None:
    """The history record of one answer (None with history off). Its status is the PACS's: the HTTP status of
    a DICOMweb answer, else the DIMSE status of a C-STORE; the DICOM reason code is in the reason's words."""
    if cfg.history_days <= 0:
        return None
    if fate.verdict is Verdict.DELIVERED:
        outcome = history.DUPLICATE if result.outcome is Outcome.DUPLICATE else history.DELIVERED
    elif fate.verdict is Verdict.FAILED and fate.reason is not None:
        outcome = _FAILED_OUTCOMES[fate.reason]
    else:
        outcome = history.WAITING
    status = result.http_status if result.http_status is not None else result.reason_code
    return history.record_of(item.info, item.spool, item.path, time.time(), route=item.route,
                             destination=dest, outcome=outcome, status_code=status, reason=detail,
                             attempt=attempt, duration_ms=duration_ms)


def changed_update(dest: str, item: Item, result: InstanceResult, cfg: DeliveryConfig,
                   duration_ms: float | None) -> Update:
    """What `dest` confirmed of a file dropped meanwhile (it changed in sending/): for the lasting instance
    memory, and its history record; the file's rows are another version's now."""
    record = _record(dest, item, result, Fate(Verdict.DELIVERED, 0), cfg,
                     f"{describe(result)} (the file changed in sending/ since: this is the version sent)", 0, duration_ms)
    return Update(str(item.path), dest, "delivered", result.outcome.value, sop=item.info.sop_instance_uid,
                  digest=item.info.digest, record=record)


def log_attempt(dest: str, items: list[Item], results: list[InstanceResult], status: int | None, ms: float,
                attempt: int) -> None:
    """Log one request to `dest`: a line per outcome, naming its files and UIDs."""
    by_outcome: dict[Outcome, list[tuple[Item, InstanceResult]]] = {}
    for item, result in zip(items, results):
        by_outcome.setdefault(result.outcome, []).append((item, result))
    http = f"HTTP {status}" if status is not None else "no answer"
    for outcome, pairs in by_outcome.items():
        files = ",".join(i.spool.relative_text(i.path) for i, _ in pairs)
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
