"""The validation policy: what happens to a file claimed into sending/ before any PACS sees it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from loguru import logger

from relaypacsd import archive, dicomfile, fate, history, routing
from relaypacsd.config import Config
from relaypacsd.delivery import Engine
from relaypacsd.dicomfile import DicomInfo
from relaypacsd.errors import InvalidDicomError, JournalError, RelayPacsError
from relaypacsd.holding import Valid
from relaypacsd.names import is_valid_utf8, printable
from relaypacsd.sidecars import now_iso
from relaypacsd.spool import Spool



class Validation:
    """Validates files for the intake's threads (`check` each, `submit` a group's valid ones together; `validate`
    both for one file, `Daemon._validate`); remembers the truncated files that may still grow."""

    def __init__(self, config: Config, engine: Engine, counters: dict[str, int], settle: dict[Path, float],
                 queue: Callable[[Spool, Path], None], emptied: Callable[[Spool, Path], None]):
        self.config, self.engine, self.counters, self._settle = config, engine, counters, settle
        self._queue_intake = queue  # a file to validate (again): a renamed one, a zip's members
        self._may_be_empty = emptied  # a folder a move out of it may have emptied
        self._growing: dict[Path, float] = {}  # truncated files that may still grow -> unchanged since (monotonic)
        self._grown: dict[Path, tuple[int, int]] = {}  # their (size, mtime) when last looked at
        self._routes = config.routes  # [[route]]: none routes every file to every active PACS
        self._attributes = routing.keywords(config.routes)  # what the walk reads for them

    def waiting(self) -> int:
        """How many truncated files wait in sending/ for their grace."""
        return len(self._growing)

    def validate(self, spool: Spool, path: Path) -> None:
        """Submit a valid file, refuse an invalid one to failed/, unpack a zip; a truncated one waits its grace."""
        valid = self.check(spool, path)
        if valid is not None:
            self.submit([valid])

    def check(self, spool: Spool, path: Path) -> Valid | None:
        """`validate` up to the submission: the valid file with its route, or None when it was refused (to
        failed/), unpacked, renamed or left to grow, or is held already."""
        if self.engine.known(path):
            return None
        if not is_valid_utf8(path):
            # Left in sending/ by an older run (or put there by hand): SQLite, sidecars and logs need UTF-8.
            rel = spool.relative(path)
            renamed = spool.make_valid(path)
            if renamed is not None:
                logger.warning("{} in sending/ has a name that is not valid UTF-8: renamed {}",
                               printable(rel), spool.relative(renamed))
                self._queue_intake(spool, renamed)
                if renamed.parent != path.parent:
                    self._may_be_empty(spool, path.parent)
            return None
        try:
            info = dicomfile.inspect(path, strict_meta_uid=self.config.delivery.strict_meta_uid,
                                     attributes=self._attributes)
        except FileNotFoundError:
            return None
        except dicomfile.ArchiveFound:  # unpacked into sending/<name>/..., the archive itself goes to sent/
            self._unpack(spool, path)
            return None
        except InvalidDicomError as exc:
            grace = fate.truncation_grace(self._settle.get(spool.root, 2.0))
            if fate.may_still_grow(exc, self._quiet_for(path), grace):
                # A writer on a share may pause longer than the settle time: leave it in sending/ and
                # look again at the next sweep instead of failing a file that may still be growing.
                if path not in self._growing:
                    self._growing[path] = time.monotonic()
                    logger.info("{} looks incomplete: checking again at the next sweep; it fails once unchanged "
                                "for {:.0f} s", spool.relative(path), grace)
                return None
            self._forget_growing(path)
            new = self._refuse(spool, path, exc)
            # No PACS saw it: say what refused it ("PACS forward" is for what a PACS did).
            logger.warning("validation refused {}: {} (moved to failed/{})", spool.relative(path), exc,
                           spool.relative(new))
            return None
        self._forget_growing(path)
        if info.meta_sop_instance_uid:
            logger.warning("{}: its file meta names SOP instance {} but its data set {}: forwarded by the data "
                           "set's UID, which the PACS files it under (delivery.strict_meta_uid = true refuses "
                           "such files)", spool.relative(path), info.meta_sop_instance_uid, info.sop_instance_uid)
        decision = (routing.decide(self._routes, info.attrs, str(spool.root), spool.relative_text(path))
                    if self._routes else None)
        return Valid(path, spool, info, decision)

    def submit(self, files: list[Valid]) -> None:
        """Hand valid files to the engine with one journal commit; one no route takes goes to failed/."""
        for f, exc in zip(files, self.engine.submit_many(files)):
            if exc is not None:  # no route matched, or none of its PACS is active: failed/, stage routing
                spool, path = f.spool, f.path
                new = self._refuse(spool, path, exc, _routing_sidecar(f.info, exc), info=f.info, route=exc.route)
                self.engine.journal.rename(str(path), str(new))  # rows it kept from before (a retry finds them)
                logger.warning("routing refused {}: {} (moved to failed/{})", spool.relative(path), exc,
                               spool.relative(new))

    def _unpack(self, spool: Spool, path: Path) -> None:
        """Unpack a zip into sending/<name>/... and queue its members; a bad archive goes to failed/."""
        try:
            members = archive.unpack_to_sending(spool, path)
            for member in members:
                self._queue_intake(spool, member)
            if members:
                folder = Path(os.path.commonpath([str(m.parent) for m in members]))
                logger.info("unpacked {} into {}: {} file(s)", spool.relative(path),
                            spool.relative(folder), len(members))
            self._may_be_empty(spool, path.parent)
        except archive.UnpackInterrupted as exc:
            logger.error("unpack: {}", exc)
        except archive.BadArchive as exc:
            stage, next_step = fate.refusal(exc)
            new = spool.finish(path, "failed", {"reason": str(exc), "stage": stage, "time": now_iso(),
                                                "next_step": next_step})
            self.record_refusal(spool, path, new, stage, str(exc))
            self._may_be_empty(spool, path.parent)
            logger.warning("validation refused archive {}: {} (moved to failed/{})", spool.relative(path), exc,
                           spool.relative(new))

    def _refuse(self, spool: Spool, path: Path, exc: RelayPacsError, extra: dict[str, object] | None = None, *,
                info: DicomInfo | None = None, route: str = "") -> Path:
        """Move a file that validation or routing refused to failed/ with its sidecar, as fate.refusal says, and
        record the refusal in the delivery history (`info`: what the walk read of a valid instance)."""
        stage, next_step = fate.refusal(exc)
        new = spool.finish(path, "failed", {"reason": str(exc), "stage": stage, "time": now_iso(),
                                            "next_step": next_step, **(extra or {})})
        self.record_refusal(spool, path, new, stage, str(exc), info=info, route=route)
        self.counters["failed"] += 1
        self._may_be_empty(spool, path.parent)
        return new

    def record_refusal(self, spool: Spool, path: Path, new: Path, stage: str, reason: str, *,
                       info: DicomInfo | None = None, route: str = "") -> None:
        """Add a refusal to the delivery history: the file claimed as `path`, now `new` in failed/, refused at
        `stage` (validation, dicomdir, archive, routing) before any PACS saw it."""
        if self.config.delivery.history_days <= 0:
            return
        why = f"{stage}: {reason}"
        if info is not None:  # routing: what the walk read, not read again
            record = history.record_of(info, spool, path, time.time(), route=route, outcome=history.REFUSED,
                                       reason=why)
        else:
            record = history.record_of_file(spool, new, time.time(), outcome=history.REFUSED, reason=why, name=path)
        try:
            self.engine.journal.record_history([record])
        except JournalError as exc:  # the file is in failed/ with its sidecar: only the history lacks it
            logger.warning("delivery history: cannot record the refusal of {}: {}", spool.relative(path), exc)

    def _quiet_for(self, path: Path) -> float:
        """Seconds an incomplete file has stayed unchanged (size and mtime) since this daemon first saw it so.

        Monotonic, never the mtime: a share's clock behind ours made a file being written look old (half of
        it failed at once), one ahead made it look new forever. A change starts the count again."""
        try:
            st = path.stat()
        except OSError:
            return 0.0
        key, now = (st.st_size, st.st_mtime_ns), time.monotonic()
        if self._grown.get(path) != key or path not in self._growing:
            self._grown[path] = key
            if path in self._growing:
                self._growing[path] = now
            return 0.0
        return now - self._growing[path]

    def _forget_growing(self, path: Path) -> None:
        self._growing.pop(path, None)
        self._grown.pop(path, None)


def _routing_sidecar(info: DicomInfo, exc: routing.Unrouted) -> dict[str, object]:
    """What a routing refusal's sidecar adds: the instance (start-up follows rows by it), its route, each route
    tried."""
    extra: dict[str, object] = {"sop_instance_uid": info.sop_instance_uid,
                                "study_instance_uid": info.study_instance_uid}
    if exc.route:
        extra["route"] = exc.route
    if exc.decision is not None:
        extra["routes"] = [t.to_dict() for t in exc.decision.tried]
    return extra
