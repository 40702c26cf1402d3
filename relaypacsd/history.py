"""The lasting delivery history: one record per instance, per destination, per outcome, kept `history_days`.

The journal's rows of a file go once it leaves sending/; these records stay, so "did the CT of this patient
reach the breast PACS, and when?" has an answer a year later (`relaypacsd history`). A record holds what
identifies an instance (UIDs, PatientID, AccessionNumber, Modality), never PatientName, never pixel data.
The journal writes them in the same commit as the answer they describe (journal.Update.record).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relaypacsd.dicomfile import DicomInfo
    from relaypacsd.spool import Spool

HISTORY_DAYS = 365.0  # daemon.history_days' default

# Outcomes: what happened to one instance at one destination (or before any destination saw it).
DELIVERED = "delivered"                  # the PACS confirmed it
DUPLICATE = "duplicate"                  # the PACS already had it: counts as delivered
UID_CONFLICT = "uid_conflict"            # confirmed earlier under this SOPInstanceUID with other content
WAITING = "waiting"                      # not delivered this time (busy, down, unclear): tried again later
FAILED = "failed"                        # the PACS refused it for good
TOO_OLD = "too_old"                      # still undelivered after delivery.max_age_hours
RETRIES_EXHAUSTED = "retries_exhausted"  # an unclear rejection, every delivery it gets spent
REFUSED = "refused"                      # refused before any PACS saw it (validation, routing): no destination
REQUEUED = "requeued"                    # an operator put it back in sending/ (`relaypacsd retry`, the dashboard)
PAUSED = "paused"                        # an operator paused the destination (no instance: `relaypacsd pause`)
RESUMED = "resumed"                      # an operator resumed it
OUTCOMES = (DELIVERED, DUPLICATE, UID_CONFLICT, WAITING, FAILED, TOO_OLD, RETRIES_EXHAUSTED, REFUSED, REQUEUED,
            PAUSED, RESUMED)

DEFAULT_LIMIT = 50


@dataclass  # not frozen: made for every answer (see journal.DeliveryRow)
class HistoryRecord:
    """One event in an instance's life: where it went and what the destination said. Times in seconds since
    the epoch; `status_code` is the HTTP status of a DICOMweb answer, the DIMSE status of a C-STORE; `user` is
    the operator for a requeue."""

    time: float
    watch: str = ""
    file: str = ""  # the name as claimed, below the watch root's sending/ (CT1/IM0001.dcm)
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    patient_id: str = ""
    accession_number: str = ""
    modality: str = ""
    route: str = ""
    destination: str = ""
    outcome: str = ""
    status_code: int | None = None
    reason: str = ""
    bytes: int = 0
    attempt: int = 0
    duration_ms: float | None = None
    user: str = ""


@dataclass(frozen=True)
class HistoryQuery:
    """What `find_history` looks for: every filter given must match (None or '' matches anything); the newest
    `limit` records come back (0: every match), newest first. `since` and `until` bound the time, both
    included (seconds since the epoch)."""

    study: str | None = None
    patient: str | None = None
    accession: str | None = None
    sop: str | None = None
    file: str | None = None
    pacs: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = DEFAULT_LIMIT


def record_of(info: "DicomInfo", spool: "Spool", path: Path, now: float, *, route: str = "", destination: str = "",
              outcome: str, status_code: int | None = None, reason: str = "", attempt: int = 0,
              duration_ms: float | None = None, user: str = "") -> HistoryRecord:
    """The record of one valid instance's event (its identifying attributes from the validation's walk)."""
    return HistoryRecord(now, str(spool.root), spool.relative_text(path), info.sop_instance_uid, info.sop_class_uid,
                         info.series_instance_uid, info.study_instance_uid, info.patient_id, info.accession_number,
                         info.modality, route, destination, outcome, status_code, reason, info.size, attempt,
                         duration_ms, user)


# What identifies an instance, read from a file that was never validated (a refusal) or validated by another
# process (a requeue): by keyword, never PatientName, and never beyond the pixel data.
_IDENTIFYING = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID",
                "AccessionNumber", "Modality")


def record_of_file(spool: "Spool", path: Path, now: float, *, outcome: str, reason: str = "", destination: str = "",
                   route: str = "", user: str = "", name: Path | None = None) -> HistoryRecord:
    """The record of an event about a file read here: what of its identifying attributes can be read ('' for
    the rest: a refused file may be no DICOM at all). `name`: where it was claimed, when `path` is elsewhere."""
    values = dict.fromkeys(_IDENTIFYING, "")
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_IDENTIFYING))
        for keyword in _IDENTIFYING:
            values[keyword] = str(ds.get(keyword, "") or "").strip("\0 ")
    except Exception:  # junk, truncated, unreadable: its record says what happened, without its UIDs
        pass
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0
    return HistoryRecord(now, str(spool.root), spool.relative_text(name if name is not None else path),
                         values["SOPInstanceUID"], values["SOPClassUID"], values["SeriesInstanceUID"],
                         values["StudyInstanceUID"], values["PatientID"], values["AccessionNumber"], values["Modality"],
                         route, destination, outcome, None, reason, size, 0, None, user)


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float) -> float:
    """`text` as seconds since the epoch: relative to `now` ('90m', '2h', '3d', '1w' ago) or ISO 8601
    ('2024-05-01', '2024-05-01T08:30', '2024-05-01T08:30:00+02:00'; without an offset UTC, as the history
    shows times). ValueError saying what is accepted otherwise."""
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a time ago (30m, 2h, 3d, 1w) nor ISO 8601 "
                         "(2024-05-01, 2024-05-01T08:30, 2024-05-01T08:30:00+02:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    value = moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r}: not a usable time")
    return value
