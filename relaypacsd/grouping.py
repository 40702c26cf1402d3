"""Which files go into one request: the daemon's workers and `relaypacsd send` group alike."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from relaypacsd.dicomfile import DicomInfo

T = TypeVar("T")


def fill_batch(first: T, candidates: Iterable[T], info_of: Callable[[T], DicomInfo], max_n: int, max_bytes: int,
               usable: Callable[[T], bool] = lambda _c: True) -> list[T]:
    """A request led by `first` (not among `candidates`): its study's files first, then any other, within the instance and byte caps.

    Never two files with one SOP Instance UID (the PACS answers per UID: they could not be told apart), and
    only candidates that are `usable` (not held by another request to the same PACS)."""
    candidates = list(candidates)
    batch, size = [first], info_of(first).size
    study = info_of(first).study_instance_uid
    uids = {info_of(first).sop_instance_uid}
    # Same study first, then anything else, so requests stay full under mixed traffic.
    for same_study in (True, False):
        for c in candidates:
            if len(batch) >= max_n:
                return batch
            info = info_of(c)
            if same_study != (info.study_instance_uid == study):
                continue
            if size + info.size > max_bytes or info.sop_instance_uid in uids or not usable(c):
                continue
            batch.append(c)
            uids.add(info.sop_instance_uid)
            size += info.size
    return batch
