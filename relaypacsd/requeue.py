"""An operator's retry: a file in failed/ goes back to sending/ with its journal rows, for `retry` and later the dashboard.

Prints nothing: the caller reports what `requeue` returns or raises.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from relaypacsd.errors import RequeueError
from relaypacsd.journal import Journal
from relaypacsd.spool import Spool, clashed, sidecar_path


@dataclass(frozen=True)
class Requeued:
    """Where a retried file now is, the PACS whose 'failed' rows went back to 'pending', and what to tell."""

    new_path: Path
    reset_dests: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def requeue(spool: Spool, journal: Journal | None, path: Path) -> Requeued:
    """Move the failed file `path` back to sending/ (with its journal rows when there is a journal).

    Raises RequeueError when it cannot be moved; the file then stays in failed/ with its rows."""
    try:
        if journal is None:
            return Requeued(spool.requeue(path))
        return _requeue_with_rows(spool, journal, path)
    except OSError as exc:
        raise RequeueError(f"{path}: cannot move it back to sending/ ({exc})") from exc


def _requeue_with_rows(spool: Spool, journal: Journal, path: Path) -> Requeued:
    """Move a failed file back to sending/ with its journal rows.

    Once the file is in sending/, a running daemon may take it at once and must find 'delivered' rows there
    for the PACS that have it, or it sends the file to them again. So the rows are copied first, to a name
    that holds neither a file nor rows, the file moves to exactly that name (another name gets its own copy
    first), and only then do its rows in failed/ go. Killed anywhere, the file keeps its rows; at worst a
    copy is left under a name with no file, which start-up drops.

    The copy carries a token of this retry: when the name turns out taken, only the copy is taken back, never
    rows the daemon wrote there meanwhile for a file it claimed under that name."""
    key = str(path)
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
    try:
        sidecar_path(path).unlink(missing_ok=True)
    except OSError as exc:  # the file is back in sending/ with its rows: only the old reason stays behind
        warnings.append(f"could not remove {sidecar_path(path)} ({exc.strerror}): delete it by hand")
    return Requeued(target, reset, warnings)
