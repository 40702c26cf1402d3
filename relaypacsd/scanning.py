"""The scanner of one watch root: claims what its watcher finds settled and queues it for validation."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loguru import logger

from relaypacsd.errors import AlreadyFinished, JournalError, RelayPacsError
from relaypacsd.names import is_valid_utf8, printable
from relaypacsd.renames import sync_dirs
from relaypacsd.spool import Spool
from relaypacsd.watcher import InboxWatcher

if TYPE_CHECKING:
    from relaypacsd.nodes import Node

TICK = 0.2  # seconds between looks at the watcher's candidates when no event says a file is complete
GATHER = 0.005  # after such an event, the rest of a burst arrives for this long: claims stay grouped
CLAIM_GROUP = 32  # files claimed per directory fsync (and per journal round trip of a shared journal)
AWAY_TICK = 1.0  # seconds between looks while the journal is away


class Scanner:
    """One watch root's scanner (huey's BaseProcess shape: initialize / loop / shutdown; `run` repeats loop).

    One per root: a share that hangs (a hard NFS mount) must not stop the others."""

    def __init__(self, spool: Spool, watcher: InboxWatcher, stop: threading.Event,
                 queue: Callable[[Spool, Path], None], emptied: Callable[[Spool, Path], None],
                 node: "Node | None" = None):
        self.spool, self.watcher, self.stop = spool, watcher, stop
        self._queue = queue  # hands a claimed file to validation
        self._emptied = emptied  # a folder a claim may have emptied
        self.node = node  # several gateways: who may claim what (relaypacsd.nodes); None: everything is ours

    def initialize(self) -> None:
        """Start the watcher's events."""
        self.watcher.start()

    def run(self) -> None:
        """Loop until this generation's stop: each look, then sleep until an event or the next rescan."""
        arrived = self.watcher.arrived
        assert arrived is not None
        while not self.stop.is_set():
            arrived.clear()  # before the look: an event during it makes the next look come at once
            if self.stop.is_set():  # set since the loop's check: the wake that came with it was just cleared
                return
            if arrived.wait(self.loop()):
                self.stop.wait(GATHER)

    def loop(self) -> float:
        """One look: claim what is settled and queue it; return the seconds to wait for the next look."""
        spool, stop, node = self.spool, self.stop, self.node
        if node is not None and not node.usable():
            return AWAY_TICK  # the journal away or the lease not fresh: files wait in inbox/, events queue up
        try:
            ready = self.watcher.tick()
            # Claim in small groups: one fsync per directory and group, before anything is sent,
            # and the first files reach validation without waiting for a large burst.
            for i in range(0, len(ready), CLAIM_GROUP):
                group = ready[i:i + CLAIM_GROUP]
                # Not reserved: another node's now. Alone on the spool every file is ours, and no set of them is
                # made (hashing each Path cost ~10 us a file).
                allowed = node.reserve(group) if node is not None and node.shared else None
                # Stopped (also after a tick that hung past a reload): claim nothing more.
                claimed = [m for m in (self.claim(p) for p in group
                                       if (allowed is None or p in allowed) and not stop.is_set()) if m]
                sync_dirs(claimed)
                if node is not None:
                    node.claimed(group if allowed is None else allowed, claimed)
                for moved in claimed:
                    self._queue(spool, moved)
            # Idle (nothing settling), sleep until the next rescan: any event wakes the scanner then.
            return self.watcher.idle_wait(TICK)
        except JournalError as exc:
            if node is None:
                logger.exception("watch {}: scan failed; retrying", spool.inbox)
                return TICK
            # Claimed files not yet recorded as ours stay in sending/; they are taken up after a lease (nodes.grace).
            node.journal_failed(exc)
            return AWAY_TICK
        except Exception:
            logger.exception("watch {}: scan failed; retrying", spool.inbox)
            return TICK

    def claim(self, path: Path) -> Path | None:
        """Claim one file; a file that cannot be moved is logged and left, never holding up the others."""
        spool = self.spool
        try:
            moved = spool.claim(path, sync=False)
        except AlreadyFinished as exc:
            logger.info("{}", exc)
            return None
        except (OSError, RelayPacsError) as exc:
            logger.error("cannot claim {} (moving it to sending/ failed: {}); it stays in inbox/ and is tried at "
                         "the next rescan: check that folder's permissions", printable(spool.relative(path)),
                         printable(str(exc)))
            return None
        if moved is not None:
            if not is_valid_utf8(path):  # once: from here on the file has a valid UTF-8 name everywhere
                logger.warning("{} has a name that is not valid UTF-8 (an SMB client's Latin-1?): claimed as {}",
                               printable(spool.relative(path)), spool.relative(moved))
            if os.path.dirname(path) != spool.inbox_text:  # as text: this runs for every file
                self._emptied(spool, path.parent)
        return moved

    def shutdown(self) -> None:
        """Wake the scanner (it may be waiting for the next rescan) and stop the watcher."""
        if self.watcher.arrived is not None:
            self.watcher.arrived.set()
        self.watcher.stop()
