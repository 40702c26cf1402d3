"""What a PACS answer means for each instance sent: the one place that decides it.

A STOW-RS answer is reconciled per SOPInstanceUID (DICOM PS3.18 §10.5.3, Annex I): an instance is
delivered only when the PACS lists it in ReferencedSOPSequence (0008,1199). The HTTP status alone is
never trusted: Orthanc answers 400 for a batch and still stores its good parts, or 200 and stores
nothing (see /work/shared/notes/orthanc.md).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from relaypacsd import dicomjson

# DICOM JSON tags (PS3.18 Annex F) of the Store Instances Response Module.
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

DESTINATION_STATUSES = frozenset({401, 403, 404, 405, 415})


class Outcome(str, enum.Enum):
    """The fate of one instance after one attempt."""

    DELIVERED = "delivered"      # SOPInstanceUID in ReferencedSOPSequence
    DUPLICATE = "duplicate"      # the PACS already has it: counts as delivered
    TRANSIENT = "transient"      # may succeed later: keep in the queue, back off
    LIMITED = "limited"          # retry a few times, then failed/
    PERMANENT = "permanent"      # the PACS will never take this file: failed/
    DESTINATION = "destination"  # the PACS's setup, not the file: pause the destination
    SPLIT = "split"              # unknown within a batch: resend in smaller batches first
    # Confirmed, but that PACS confirmed this SOPInstanceUID earlier for other content (decided by the engine
    # from its journal, never from an answer alone): the PACS may have kept the earlier version. failed/.
    UID_CONFLICT = "uid_conflict"

    @property
    def delivered(self) -> bool:
        """True when the PACS holds the instance."""
        return self in (Outcome.DELIVERED, Outcome.DUPLICATE)


@dataclass  # not frozen: one per instance answered (see journal.DeliveryRow)
class InstanceResult:
    """One instance's outcome, with the words a technician reads in the log and the journal."""

    sop_uid: str
    outcome: Outcome
    http_status: int | None
    reason_code: int | None
    reason: str


# PS3.18 Table I.2-2 (failure) and I.2-3 (warning), plus codes seen in the wild (pitfalls.md §1).
_EXACT_REASONS: dict[int, str] = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance: the PACS already has it",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0213: "resource limitation",
    0xA770: "duplicate rejected (dcm4chee): the PACS already has it",
    0xA900: "data set does not match SOP class",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class (warning)",
    0xB00E: "already stored (Azure): the PACS already has it",
    0xC122: "transfer syntax not supported",
}
_DUPLICATE_CODES = frozenset({0x0111, 0xA770, 0xB00E})
NOT_AUTHORIZED = 0x0124
NOT_AUTHORIZED_FIX = "our user or AE title may not store it; allow it on the PACS (the file waits and is retried)"


def describe_reason(code: int) -> str:
    """Technician's words for a Failure/WarningReason code, e.g. 0xA700 -> 'out of resources (A7xx)'."""
    if code in _EXACT_REASONS:
        return _EXACT_REASONS[code]
    high = code & 0xFF00
    if high == 0xA700:
        return "out of resources (A7xx)"
    if high == 0xA900:
        return "data set does not match SOP class (A9xx)"
    if code & 0xF000 == 0xC000:
        return "cannot understand (Cxxx)"
    if code & 0xF000 == 0xB000:
        return "warning (Bxxx)"
    return "unknown reason code"


def classify_reason(code: int) -> Outcome:
    """Map one FailureReason (0008,1197) to an outcome."""
    # Duplicates first: 0xA770 would otherwise fall in the A7xx "out of resources" range.
    if code in _DUPLICATE_CODES:
        return Outcome.DUPLICATE
    if code == NOT_AUTHORIZED:
        # Not authorized: a permission the PACS lacks, never the file's fault. Per instance (an access rule
        # on one study), so the file waits and is retried; pausing the whole PACS would hold up the others.
        return Outcome.TRANSIENT
    if code == 0x0213 or code & 0xFF00 == 0xA700:
        return Outcome.TRANSIENT
    if code == 0x0122 or code & 0xFF00 == 0xA900 or code & 0xF000 == 0xC000:
        return Outcome.PERMANENT
    # 0x0110 is generic (Orthanc also uses it for a study UID mismatch); unknown codes alike.
    return Outcome.LIMITED


def format_code(code: int) -> str:
    """'0x0110 (processing failure)'."""
    return f"0x{code:04X} ({describe_reason(code)})"


def results_for_error(sent_uids: Iterable[str], outcome: Outcome, reason: str,
                      http_status: int | None = None) -> list[InstanceResult]:
    """The same outcome for every instance of a request (network errors, 401, ...)."""
    return [InstanceResult(uid, outcome, http_status, None, reason) for uid in sent_uids]


def reconcile(http_status: int, body: Mapping[str, Any] | None, sent_uids: list[str]) -> list[InstanceResult]:
    """One InstanceResult per sent UID, in order, from the HTTP status and the DICOM JSON answer."""
    if http_status in DESTINATION_STATUSES:
        # The PACS's setup refused the request: never blame (or fail) the files for it.
        why = _destination_words(http_status)
        return results_for_error(sent_uids, Outcome.DESTINATION, why, http_status)

    referenced = _items_by_uid(body, REFERENCED_SOP_SEQUENCE)
    failed = _items_by_uid(body, FAILED_SOP_SEQUENCE)
    batch = len(sent_uids) > 1
    results = []
    for uid in sent_uids:
        if uid in referenced:
            results.append(_delivered(uid, http_status, referenced[uid]))
        elif uid in failed:
            results.append(_failed(uid, http_status, failed[uid]))
        else:
            results.append(_unconfirmed(uid, http_status, batch))
    return results


def _delivered(uid: str, status: int, item: Mapping[str, Any]) -> InstanceResult:
    warning = _int_value(item, WARNING_REASON)
    if warning is None:
        return InstanceResult(uid, Outcome.DELIVERED, status, None, "stored: listed in ReferencedSOPSequence")
    return InstanceResult(uid, Outcome.DELIVERED, status, warning,
                          f"stored with warning {format_code(warning)}")


def _failed(uid: str, status: int, item: Mapping[str, Any]) -> InstanceResult:
    code = _int_value(item, FAILURE_REASON)
    if code is None:
        # Listed as failed without a reason: as undecided as a generic processing failure.
        return InstanceResult(uid, Outcome.LIMITED, status, None,
                              f"PACS listed it in FailedSOPSequence without a FailureReason (HTTP {status})")
    outcome = classify_reason(code)
    if outcome is Outcome.DUPLICATE:
        return InstanceResult(uid, outcome, status, code, f"PACS already has it: {format_code(code)}")
    if code == NOT_AUTHORIZED:
        return InstanceResult(uid, outcome, status, code,
                              f"PACS refused it: FailureReason {format_code(code)}: {NOT_AUTHORIZED_FIX}")
    return InstanceResult(uid, outcome, status, code, f"PACS refused it: FailureReason {format_code(code)}")


def _unconfirmed(uid: str, status: int, batch: bool) -> InstanceResult:
    if status == 408 or status == 429 or 500 <= status <= 599:
        # Busy or broken server: the whole request is worth resending later, as is. Splitting a
        # batch here would only multiply requests to a server that asked us to slow down.
        return InstanceResult(uid, Outcome.TRANSIENT, status, None,
                              f"PACS busy or failing (HTTP {status}): will retry later")
    if batch:
        if status == 413:
            return InstanceResult(uid, Outcome.SPLIT, status, None,
                                  "request too large for this PACS (HTTP 413): resending in smaller batches")
        return InstanceResult(uid, Outcome.SPLIT, status, None,
                              f"PACS neither confirmed nor refused it within a batch (HTTP {status}): "
                              "resending in smaller batches")
    if 200 <= status <= 299:
        return InstanceResult(uid, Outcome.LIMITED, status, None,
                              f"PACS answered {status} but did not confirm the instance")
    if status in (400, 409):
        return InstanceResult(uid, Outcome.PERMANENT, status, None,
                              f"PACS rejected the file (HTTP {status}) without saying why: "
                              "look at the PACS's log for this SOPInstanceUID")
    if status == 413:
        # The limit is the PACS's (or its proxy's) setting, not a fault of the file: it waits until raised.
        return InstanceResult(uid, Outcome.TRANSIENT, status, None,
                              "file too large for this PACS or a proxy in front of it (HTTP 413): raise its upload "
                              "limit (nginx: client_max_body_size); the file waits and is retried")
    return InstanceResult(uid, Outcome.LIMITED, status, None,
                          f"unexpected answer HTTP {status}, instance not confirmed")


def _destination_words(status: int) -> str:
    return {
        401: "PACS refused our credentials (HTTP 401): check username/password or token",
        403: "PACS denied permission to store (HTTP 403): check the user's rights on the PACS",
        404: "DICOMweb endpoint not found (HTTP 404): check type / dicomweb_root",
        405: "DICOMweb endpoint does not accept STOW-RS (HTTP 405): check type / dicomweb_root",
        415: "PACS refused the media type (HTTP 415): is DICOMweb STOW-RS enabled there?",
    }[status]


def _items_by_uid(body: Mapping[str, Any] | None, tag: str) -> dict[str, Mapping[str, Any]]:
    """Items of a response sequence keyed by their ReferencedSOPInstanceUID; tolerant of junk."""
    if not isinstance(body, Mapping):
        return {}
    out: dict[str, Mapping[str, Any]] = {}
    for item in dicomjson.values(body, tag):
        if not isinstance(item, Mapping):
            continue
        uid = dicomjson.first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str) and uid.strip("\0 "):
            out[uid.strip("\0 ")] = item  # UI values may be NUL-padded (PS3.5 6.2), as ours were stripped
    return out


def _int_value(item: Mapping[str, Any], tag: str) -> int | None:
    """A US value: DICOM JSON gives it as a decimal number; tolerate a decimal or 0x-hex string."""
    value = dicomjson.first(item, tag)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 16) if text.lower().startswith("0x") else int(text)
        except ValueError:
            return None
    return None
