"""Where a file goes next: the one place that decides it, to be read against the README's outcome table.

`outcomes.py` says what a PACS answer means for one instance; this module turns that meaning (and a file's
age, its attempts, a validation refusal) into the file's fate. It decides only: the engine and the daemon
do the journal writes, the moves and the logs (the shape of huey's `Huey._execute`).

| what happened                                         | fate                                     |
|-------------------------------------------------------|------------------------------------------|
| delivered or duplicate at one PACS                    | DELIVERED there                          |
| UID conflict (confirmed earlier for other content)    | FAILED there: uid_conflict               |
| permanent                                             | FAILED there: permanent                  |
| anything else, once older than max_age_hours          | FAILED there: too_old                    |
| limited, at the LIMITED_MAX_DELIVERIES-th delivery    | FAILED there: limited                    |
| transient, limited before that                        | WAIT, the attempt spent                  |
| destination problem                                   | WAIT, no attempt spent                   |
| every active PACS settled, none FAILED                | the file goes to sent/                   |
| some PACS FAILED it                                   | the file goes to failed/                 |
| an active PACS's verdict is lost (no row, no memory)  | the file stays in sending/               |
| validation refusal (junk, no UIDs, no Part-10 header) | failed/, stage "validation"              |
| no route matches, or its PACS are none of them active | failed/, stage "routing"                 |
| truncated, unchanged for less than the grace          | stays in sending/, looked at again       |
| DICOMDIR                                              | failed/, stage "dicomdir"                |
| bad archive                                           | failed/, stage "archive"                 |
| in sent/ longer than sent_retention_days (if set)     | removed                                  |
| an operator's `retry` (requeue.py)                    | back to sending/: FAILED rows -> pending |
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from relaypacsd.archive import BadArchive
from relaypacsd.dicomfile import DicomDirFound, TruncatedDicom, ZeroTail
from relaypacsd.errors import InvalidDicomError, RelayPacsError
from relaypacsd.outcomes import Outcome
from relaypacsd.routing import ROUTING_NEXT_STEP, Unrouted

# How many deliveries an instance with an unclear rejection (0x0110, "200 but not confirmed") gets.
LIMITED_MAX_DELIVERIES = 3
TRUNCATION_GRACE = 10.0  # seconds (at least 5 settle times) a truncated file may still grow before it fails

# A journal row in one of these states is settled: that PACS owes nothing more (a failed file in sending/ only
# waits for its move; an operator's retry resets failed rows to pending first).
SETTLED_STATES = frozenset({"delivered", "failed"})

RETRY_NEXT_STEP = "fix or replace the file; `relaypacsd retry FILE` queues it again"
ARCHIVE_NEXT_STEP = "fix the archive, or unzip it into inbox/ yourself"


class Verdict(str, enum.Enum):
    """An instance's state at one PACS after an answer: the journal row's state."""

    DELIVERED = "delivered"
    WAIT = "waiting"
    FAILED = "failed"


class FailReason(str, enum.Enum):
    """Why a PACS's part of a file failed."""

    UID_CONFLICT = "uid_conflict"
    PERMANENT = "permanent"
    TOO_OLD = "too_old"
    LIMITED = "limited"


@dataclass(frozen=True)
class Fate:
    """One instance's fate at one PACS: the verdict, the attempts it has spent there, and why it failed."""

    verdict: Verdict
    attempts: int
    reason: FailReason | None = None


def too_old(age_s: float, max_age_s: float) -> bool:
    """True when a file waited longer than max_age_hours: it fails at the PACS that still owe it."""
    return age_s > max_age_s


def instance_fate(outcome: Outcome, attempts: int, age_s: float, max_age_s: float) -> Fate:
    """The fate at one PACS of an instance whose `attempts`-th delivery ended with `outcome`."""
    if outcome.delivered:
        return Fate(Verdict.DELIVERED, attempts)
    if outcome is Outcome.UID_CONFLICT:
        return Fate(Verdict.FAILED, attempts, FailReason.UID_CONFLICT)
    if outcome is Outcome.PERMANENT:
        return Fate(Verdict.FAILED, attempts, FailReason.PERMANENT)
    if too_old(age_s, max_age_s):
        return Fate(Verdict.FAILED, attempts, FailReason.TOO_OLD)
    if outcome is Outcome.LIMITED and attempts >= LIMITED_MAX_DELIVERIES:
        return Fate(Verdict.FAILED, attempts, FailReason.LIMITED)
    # Transient, limited, destination problem (or a split not made): the file waits. A destination problem is
    # the PACS's setup, not the file: it spends no attempt.
    return Fate(Verdict.WAIT, attempts - 1 if outcome is Outcome.DESTINATION else attempts)


def owed(state: str) -> bool:
    """True when a PACS whose journal row is in `state` still needs the file."""
    return state not in SETTLED_STATES


def file_fate(states: Mapping[str, str], destinations: Iterable[str]) -> str | None:
    """The folder for a file whose PACS have settled (`states`: destination -> row state): 'sent', 'failed',
    or None when an active destination has no verdict at all (it stays in sending/ for the next sweep)."""
    if any(state == Verdict.FAILED.value for state in states.values()):
        return "failed"
    if any(dest not in states for dest in destinations):
        return None  # never taken as sent without a confirmation
    return "sent"


def truncation_grace(settle_s: float) -> float:
    """Seconds a truncated file may stay unchanged in sending/ before it fails: at least 5 settle times."""
    return max(TRUNCATION_GRACE, 5 * settle_s)


def may_still_grow(exc: InvalidDicomError, quiet_s: float, grace_s: float) -> bool:
    """True when a refused file is truncated and has not yet stayed unchanged for the grace: it waits."""
    return isinstance(exc, TruncatedDicom) and quiet_s < grace_s


def refusal(exc: RelayPacsError) -> tuple[str, str]:
    """The sidecar's (stage, next_step) for a file validation (or routing) refused: it goes to failed/."""
    if isinstance(exc, BadArchive):
        return "archive", ARCHIVE_NEXT_STEP
    if isinstance(exc, Unrouted):  # a retry routes it again, by the routes the daemon runs with then
        return "routing", ROUTING_NEXT_STEP
    stage = "dicomdir" if isinstance(exc, DicomDirFound) else "validation"
    if isinstance(exc, ZeroTail) and exc.padding:
        # Never forwarded as it is: a preallocating writer paused past the grace looks just the same.
        return stage, (f"if the sender is done and the zeros are only padding, `truncate -s {exc.data_end} "
                       "FILE` removes them; then `relaypacsd retry FILE`. Else send the file again")
    return stage, RETRY_NEXT_STEP


def retention_over(age_s: float | None, retention_days: float) -> bool:
    """True when a file has been in sent/ longer than sent_retention_days (0: kept for ever)."""
    return retention_days > 0 and age_s is not None and age_s > retention_days * 86400
