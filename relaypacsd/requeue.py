"""An operator's retry: a file in failed/ goes back to sending/ with its journal rows, for `retry` and later the dashboard.

Prints nothing: the caller reports what `requeue` returns or raises.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from relaypacsd.errors import JournalError, RequeueError
from relaypacsd.history import REQUEUED, record_of_file
from relaypacsd.journal import Journal
from relaypacsd.names import clashed
from relaypacsd.sidecars import read_sidecar, sidecar_path
from relaypacsd.spool import Spool


@dataclass(frozen=True)
class Requeued:
    """Where a retried file now is, the PACS whose 'failed' rows went back to 'pending', and what to tell."""

    new_path: Path
    reset_dests: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def requeue(spool: Spool, journal: Journal | None, path: Path, user: str = "") -> Requeued:
    """Move the failed file `path` back to sending/ (with its journal rows, and a delivery history record naming
    the operator `user`, when there is a journal).

    Raises RequeueError when it cannot be moved; the file then stays in failed/ with its rows."""
    try:
        if journal is None:
            return Requeued(spool.requeue(path))
        return _requeue_with_rows(spool, journal, path, user)
    except OSError as exc:
        raise RequeueError(f"{path}: cannot move it back to sending/ ({exc})") from exc


def _requeue_with_rows(spool: Spool, journal: Journal, path: Path, user: str = "") -> Requeued:
    """Move a failed file back to sending/ with its journal rows.

    Once the file is in sending/, a running daemon may take it at once and must find 'delivered' rows there
    for the PACS that have it, or it sends the file to them again. So the rows are copied first, to a name
    that holds neither a file nor rows, the file moves to exactly that name (another name gets its own copy
    first), and only then do its rows in failed/ go. Killed anywhere, the file keeps its rows; at worst a
    copy is left under a name with no file, which start-up drops.

    The copy carries a token of this retry: when the name turns out taken, only the copy is taken back, never
    rows the daemon wrote there meanwhile for a file it claimed under that name."""
    key = str(path)
    # Read here, before the move: once in sending/, the daemon may take it on at once.
    was = (read_sidecar(path) or {}).get("reason", "")
    record = record_of_file(spool, path, time.time(), outcome=REQUEUED, user=user,
                            reason=f"back to sending/ by {user or 'an operator'}" + (f"; was: {was}" if was else ""))
    reset = journal.reset_failed(key)
    wanted = spool.sending / spool.relative(path)
    token = secrets.token_hex(8)
    n = 0
    while True:
        target = wanted if n == 0 else clashed(wanted, n)
        n += 1
        if os.path.lexists(target) or not journal.copy(key, str(target), token):
            continue
        try:
            spool.move_to(path, target)
        except FileExistsError:  # taken between the look and the move (the daemon claimed a file)
            journal.uncopy(str(target), token)
            continue
        except OSError:
            journal.uncopy(str(target), token)  # the file stayed in failed/, with its rows
            raise
        break
    journal.forget(key)
    warnings = []
    try:  # a record per PACS that gets the file again; one without a PACS for a file no PACS saw (a refusal)
        journal.record_history([replace(record, file=spool.relative_text(target), destination=d)
                                for d in (reset or [""])])
    except JournalError as exc:  # the file is back in sending/ with its rows: only the history lacks the retry
        warnings.append(f"the delivery history could not record this retry ({exc})")
    try:
        sidecar_path(path).unlink(missing_ok=True)
    except OSError as exc:  # the file is back in sending/ with its rows: only the old reason stays behind
        warnings.append(f"could not remove {sidecar_path(path)} ({exc.strerror}): delete it by hand")
    return Requeued(target, reset, warnings)
