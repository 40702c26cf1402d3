"""The files in failed/ with what their sidecars say (stage, reason, code, next step), for the dashboard.

The walk is `Spool.files("failed")` and each sidecar is read with `spool.read_sidecar`, as `relaypacsd retry`
does; a file is named to the outside by its watch root's index and its path below failed/ ("0/CT1/a.dcm").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from relaypacsd.errors import RequeueError
from relaypacsd.sidecars import read_sidecar, sidecar_path
from relaypacsd.spool import Spool

LIMIT = 5000  # files listed at most (the count is exact): a failed/ larger than that is a setup problem


@dataclass(frozen=True)
class FailedFile:
    """One file in failed/ and its sidecar's words (empty strings where the sidecar says nothing)."""

    id: str
    root: str
    file: str  # below failed/
    stage: str
    reason: str
    code: str  # the PACS's reason codes, "orthanc: 0xC122"
    next_step: str
    time: str
    pacs: tuple[str, ...]  # the PACS that refused it

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["pacs"] = list(self.pacs)
        return doc

    def matches(self, text: str) -> bool:
        """Case-blind search in the name, stage, reason, code and PACS."""
        text = text.lower()
        return any(text in part.lower() for part in (self.file, self.stage, self.reason, self.code, *self.pacs))


def describe(index: int, spool: Spool, path: Path) -> FailedFile:
    """One failed file from its sidecar."""
    side = read_sidecar(path) or {}
    pacs = side.get("pacs") if isinstance(side.get("pacs"), dict) else {}
    refused = tuple(name for name, row in pacs.items() if isinstance(row, dict) and row.get("state") == "failed")
    codes = [f"{name}: {pacs[name].get('reason_code')}" for name in refused if pacs[name].get("reason_code")]
    rel = spool.relative(path).as_posix()
    return FailedFile(id=f"{index}/{rel}", root=str(spool.root), file=rel, stage=str(side.get("stage", "")),
                      reason=str(side.get("reason", "no reason recorded")), code="; ".join(codes),
                      next_step=str(side.get("next_step", "")), time=str(side.get("time", "")), pacs=refused)


class FailedFiles:
    """The listing, each sidecar read again only when it changed (one stat per file on a refresh)."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, Path], tuple[tuple[int, int, int] | None, FailedFile]] = {}

    def list(self, spools: Iterable[Spool], limit: int = LIMIT) -> tuple[list[FailedFile], list[int]]:
        """Up to `limit` failed files (newest first) and the number of files in each root's failed/."""
        found: list[FailedFile] = []
        totals: list[int] = []
        seen = {}
        for index, spool in enumerate(spools):
            n = 0
            for path in spool.files("failed"):
                n += 1
                if len(found) >= limit:
                    continue
                key = (index, path)
                stamp = _stamp(sidecar_path(path))
                hit = self._known.get(key)
                entry = hit[1] if hit is not None and hit[0] == stamp and stamp is not None else describe(index, spool, path)
                seen[key] = (stamp, entry)
                found.append(entry)
            totals.append(n)
        self._known = seen  # files gone from failed/ are forgotten
        found.sort(key=lambda f: f.time, reverse=True)
        return found, totals


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def failed_files(spools: Iterable[Spool], limit: int = LIMIT) -> tuple[list[FailedFile], list[int]]:
    """Up to `limit` failed files (newest first) and the number of files in each root's failed/ (no cache)."""
    return FailedFiles().list(spools, limit)


def locate(spools: list[Spool], file_id: str) -> tuple[Spool, Path]:
    """The watch root and path of a failed file named by its id; RequeueError when there is none."""
    head, _, rest = file_id.partition("/")
    rel = PurePosixPath(rest)
    if not head.isdigit() or int(head) >= len(spools) or not rest or rel.is_absolute() or ".." in rel.parts:
        raise RequeueError(f"{file_id!r}: not a failed file's id (root index / path below failed/)")
    spool = spools[int(head)]
    path = spool.failed / Path(*rel.parts)
    if not path.is_file() or path.is_symlink():
        raise RequeueError(f"{rest}: not in {spool.failed} (retried or removed meanwhile?)")
    return spool, path
