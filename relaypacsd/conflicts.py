"""The UID-conflict check: a PACS's confirmation of a SOP Instance UID it confirmed before for other content
is turned into a UID conflict before anything logs or records it."""

from __future__ import annotations

import time

from relaypacsd.journal import Journal, KnownInstance
from relaypacsd.models import Part
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.queues import Destination, Item
from relaypacsd.spool import Spool
from relaypacsd.timefmt import iso_time

CONFLICT_NEXT_STEP = (
    "another file with this SOPInstanceUID but other content reached that PACS first (see uid_conflict): if this "
    "file is a corrected version, give it a new SOPInstanceUID (and MediaStorageSOPInstanceUID) with a DICOM editor "
    "and drop it into inbox/; or delete the earlier instance at the PACS, then `relaypacsd retry FILE`: a retry "
    "forgets the earlier version at the PACS it resets, so this file then counts as delivered when the PACS "
    "confirms it (if the earlier instance is still there, the PACS may keep it instead)")


def _shown(spool: Spool, path: str) -> str:
    """A file's path as a technician finds it: below its spool folder when it is in this watch root."""
    try:
        return spool.relative_text(path)
    except ValueError:
        return path


class UidChecked:
    """A destination's sender whose answers are checked for UID conflicts before anything logs or records them:
    a PACS's "stored" for other content under a known UID is never reported as delivered."""

    def __init__(self, journal: Journal, dest: Destination, by_part: dict[Part, Item]):
        self.journal, self.dest, self.by_part = journal, dest, by_part
        self.name, self.target = dest.sender.name, dest.sender.target

    def send(self, parts: list[Part]) -> tuple[list[InstanceResult], int | None]:
        results, status = self.dest.sender.send(parts)
        return check_uids(self.journal, self.dest.name, [self.by_part[p] for p in parts], results), status

    def probe(self) -> None:
        self.dest.sender.probe()


def check_uids(journal: Journal, dest: str, items: list[Item], results: list[InstanceResult]) -> list[InstanceResult]:
    """The PACS's answer with each confirmation of a UID it holds for other content turned into a conflict.

    No other request to this PACS holds these UIDs (Destination.in_request): this look, made before the
    answer is logged or recorded, and the commit that follows see every earlier confirmation of them."""
    uids = [i.info.sop_instance_uid for i, r in zip(items, results) if r.outcome.delivered and i.info.digest]
    if not uids:
        return results
    known = journal.known_instances(dest, uids)
    return [_check_uid(dest, item, result, known) for item, result in zip(items, results)]


def _check_uid(dest: str, item: Item, result: InstanceResult, known: dict[str, KnownInstance]) -> InstanceResult:
    """A confirmation (stored or duplicate) of a UID that this PACS confirmed before for other content is a
    UID conflict: a PACS such as Orthanc answers success and keeps the first version silently."""
    if not result.outcome.delivered or not item.info.digest:
        return result
    uid = item.info.sop_instance_uid
    earlier = known.get(uid)
    if earlier is None or earlier.digest == item.info.digest:
        known[uid] = KnownInstance(item.info.digest, str(item.path), time.time())
        return result
    earlier_file = _shown(item.spool, earlier.path)
    answer = "stored" if result.outcome is Outcome.DELIVERED else "duplicate"
    http = f"HTTP {result.http_status}" if result.http_status is not None else "C-STORE"
    with item.lock:
        item.conflicts[dest] = {
            "earlier_file": earlier_file, "earlier_delivered": iso_time(earlier.time),
            "pacs_answer": {"http_status": result.http_status, "answer": answer, "reason": result.reason},
            "note": "the PACS may have kept the earlier version: what it holds under this UID may not be this file"}
    return InstanceResult(uid, Outcome.UID_CONFLICT, result.http_status, result.reason_code,
                          f"the PACS answered {http}, {answer} ({result.reason}), but it confirmed this "
                          f"SOPInstanceUID before for other content: {earlier_file}, delivered "
                          f"{iso_time(earlier.time)}; the PACS may have kept that earlier version")
