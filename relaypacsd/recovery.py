"""Start-up repair: what an interrupted run left in the spools and the journal, and rows of deleted failures."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

from loguru import logger

from relaypacsd import archive, dicomfile
from relaypacsd.journal import Journal
from relaypacsd.names import Namesakes, unclashed
from relaypacsd.sidecars import read_sidecar
from relaypacsd.spool import Spool

FAILED_ROWS_INTERVAL = 3600.0  # seconds between looks for journal rows of files deleted from failed/
PAGE = 1000  # paths read from the journal at once


def repair_spool(spool: Spool, quiet_for: float = 0.0) -> None:
    """Create the spool's folders and finish what an interrupted run left half done in them (with several
    gateways, only what stayed untouched for `quiet_for` seconds: the rest may be another node's, under way)."""
    spool.prepare()
    for path in spool.clean_after_crash(quiet_for):
        logger.info("removed {} left in failed/ by an interrupted run", path.name)
    for path in spool.finish_interrupted_moves():
        logger.info("{} was moved by an interrupted run: the file stood under two names, and its second one in "
                    "{}/ went", spool.relative(path), path.relative_to(spool.root).parts[0])


def resume_unpacks(spool: Spool, quiet_for: float = 0.0) -> bool:
    """Finish the zip unpacks an earlier run left half done; False (logged) if that failed, to try again later."""
    try:
        moved = archive.resume_unpacks(spool, quiet_for)
    except OSError as exc:
        logger.error("finishing an interrupted zip unpack in {} failed ({}); its files stay in {}/{}* "
                     "until the next start: check that folder's permissions and free space",
                     spool.root, exc, spool.root, archive.TEMP_PREFIX)
        return False
    if moved:
        logger.info("finished a zip unpack that a previous run left half done: {} file(s) into sending/",
                    len(moved))
    return True


def settle_journal(journal: Journal, spool: Spool,
                   others: Callable[[list[str]], set[str]] = lambda keys: set()) -> None:
    """Rows left under sending/ by a run killed between a file's move and its journal update: follow the
    file into failed/, or forget them once it is in sent/. Only on evidence, the same SOP Instance UID
    under that name or one a clash gave it (a~1.dcm): names are reused, and a file merely out of sight
    (a share not mounted yet) keeps its rows, or a PACS that has it would get it again. Rows of files another
    gateway owns (`others`) are its own to settle: it may be moving that file right now."""
    namesakes = Namesakes()
    # Paged (a million rows in sending/ is a backlog, not a crash): only the gone are kept, usually none.
    gone = [key for key in _paths_under(journal, str(spool.sending)) if not os.path.exists(key)]
    theirs = others(gone) if gone else set()
    for key in gone:
        if key in theirs:
            continue
        path = Path(key)
        sop = journal.sop_of(key)
        if not sop:
            continue
        rel = spool.relative(path)
        named = rel.with_name(unclashed(rel.name))  # under that name or any ~N of it (a killed `retry`)
        # A failed file of this instance that has no rows of its own yet (rows there of another instance
        # are a deleted file's, whose name was reused).
        same = [f for f in _namesakes(namesakes, spool, spool.failed / named)
                if (read_sidecar(f) or {}).get("sop_instance_uid") == sop]
        failed = [f for f in same if journal.sop_of(str(f)) != sop]
        if failed:
            journal.rename(key, str(failed[0]))
            logger.info("journal: {} was moved to failed/ by a run that stopped before recording it", rel)
        elif same:  # a copy a killed `retry` left ahead of the file, which still holds its own rows
            journal.forget(key)
        elif any(dicomfile.sop_instance_uid(f) == sop for f in _namesakes(namesakes, spool, spool.sent / named)):
            journal.forget(key)
            logger.info("journal: {} was moved to sent/ by a run that stopped before recording it", rel)


class DeletedFailures:
    """Forgets the journal rows of files deleted from failed/, at start-up and then hourly."""

    def __init__(self, journal: Journal, spools: list[Spool]):
        self.journal, self.spools = journal, spools
        self.next_look = time.monotonic() + FAILED_ROWS_INTERVAL
        self._missing: set[str] = set()  # rows under failed/ whose file was missing at the last look

    def look_if_due(self) -> None:
        """The hourly look, at a sweep."""
        if time.monotonic() >= self.next_look:
            self.next_look = time.monotonic() + FAILED_ROWS_INTERVAL
            self.look()

    def look(self) -> int:
        """Forget the rows of files missing at two looks an hour apart (start-up makes the first). One look is
        no proof: a share not mounted yet hides failed/, and a file back in sight without its rows would be
        sent again to the PACS that confirmed it. One stat per row."""
        missing = {key for spool in self.spools for key in _paths_under(self.journal, str(spool.failed))
                   if not os.path.lexists(key)}
        gone, self._missing = missing & self._missing, missing - self._missing
        if gone:
            self.journal.forget(*gone)
            logger.info("journal: forgot {} file(s) deleted from failed/", len(gone))
        return len(gone)


def _paths_under(journal: Journal, folder: str) -> Iterator[str]:
    """Every path with rows beneath `folder`, a page at a time: a million rows are never one list."""
    after = ""
    while page := journal.paths_under(folder, after=after, limit=PAGE):
        yield from page
        after = page[-1]


def _namesakes(namesakes: Namesakes, spool: Spool, path: Path) -> list[Path]:
    """`namesakes.of(path)`, and of where a move there went when a file held one of its folders' names
    (failed/CT1 a file: failed/CT1~1/IM0001.dcm)."""
    free = spool._free_folders(path)
    return namesakes.of(path) + (namesakes.of(free) if free != path else [])


def prepare_spools(spools: list[Spool], journal: Journal, unpacks_resumed: set[Path],
                   may_be_empty: Callable[[Spool, Path, float], None],
                   others: Callable[[list[str]], set[str]] = lambda keys: set(), quiet_for: float = 0.0) -> None:
    """Before a generation starts: half-done moves and unpacks finished (unpacks once per root and process: a
    validator of an old generation may still be unpacking), stale rows settled, empty study folders marked.
    With several gateways: rows of files `others` own, and leftovers younger than `quiet_for` s, are left."""
    for spool in spools:
        repair_spool(spool, quiet_for)
        if spool.root not in unpacks_resumed and resume_unpacks(spool, quiet_for):
            unpacks_resumed.add(spool.root)
    for spool in spools:  # before recovery: stale rows must not make a new file look sent
        settle_journal(journal, spool, others)
        # Empty study folders an earlier run (or generation) left (each also costs an inotify watch): those quiet
        # go at the first sweep, the others later (the pruning keeps them queued).
        for folder in ("inbox", "sending"):
            for empty in spool.empty_folders(folder):
                may_be_empty(spool, empty, float("-inf"))  # their mtime says since when


def warn_if_nothing_forwards(enabled: bool, any_destination: bool) -> None:
    """Say at start why files will wait in sending/ when nothing forwards them."""
    if not enabled:
        logger.warning("PACS_ENABLED=false: files are watched and validated, nothing is forwarded; "
                       "valid files wait in sending/")
    elif not any_destination:
        logger.warning("no active PACS: set ACTIVE_PACS or add a [pacs.NAME] table; files wait in sending/")
