"""One destination's answers become journal state: each instance's row and history (one commit, as fate.py
decides), a park for what is tried again, and for files settled everywhere the hand-over to the finisher. A file
that changed in sending/ after its validation is dropped here, under the same lock."""

from __future__ import annotations

import threading
import time
from typing import Callable

from loguru import logger

from relaypacsd.batches import Changed
from relaypacsd.config import Config
from relaypacsd.fate import instance_fate
from relaypacsd.journal import Journal, Update
from relaypacsd.outcomes import InstanceResult
from relaypacsd.queues import Destination, Item
from relaypacsd.records import changed_update, update_for
from relaypacsd.window import Window


class Recorder:
    """Records answers and drops changed files for the engine; the engine's observers are called through it."""

    def __init__(self, config: Config, journal: Journal, window: Window, destinations: dict[str, Destination],
                 hand_over: Callable[[list[Item]], None], let_go: Callable[[list[Item]], int],
                 settled: Callable[[Destination, list[tuple[Item, Update]]], None],
                 changed: Callable[[Item, bool], None]):
        self.config = config
        self.journal = journal
        self.window = window
        self.destinations = destinations
        self._hand_over = hand_over
        self._let_go = let_go
        self._settled = settled
        self._changed = changed
        # The look at which files are still tracked and the commit are one step for drop_changed: a file
        # dropped in between gets a new version's rows under its name, which an answer in flight must not update.
        self._lock = threading.Lock()

    def record(self, dest: Destination, pairs: list[tuple[Item, InstanceResult]],
               duration_ms: float | None = None) -> None:
        """Turn each instance's outcome at one destination into journal state and history (one commit) and, for
        the files that have settled everywhere, a folder move. `duration_ms`: the request's that answered."""
        cfg = self.config.delivery
        items = self.window.items
        with self._lock:
            with self.window.lock:  # a file dropped meanwhile (it changed): its answer is about an old version
                dropped = [(item, r) for item, r in pairs if items.get(item.path) is not item]
                pairs = [(item, r) for item, r in pairs if items.get(item.path) is item]
            # Yet the PACS has those old bytes under the UID now: remembered, so the new version conflicts there.
            self.journal.remember([changed_update(dest.name, item, r, cfg, duration_ms)
                                   for item, r in dropped if r.outcome.delivered])
            if not pairs:
                return
            rows = self.journal.rows_at(dest.name, [str(item.path) for item, _ in pairs])
            updates: list[Update] = []
            settled: list[tuple[Item, Update]] = []
            parked: list[tuple[Item, float]] = []
            for item, result in pairs:
                row = rows.get(str(item.path))
                attempt = (row.attempts if row else 0) + 1
                fate = instance_fate(result.outcome, attempt, time.monotonic() - item.born, cfg.max_age_hours * 3600)
                update, delay = update_for(dest.name, item, result, fate, cfg, attempt=attempt, duration_ms=duration_ms)
                updates.append(update)
                if delay is None:
                    settled.append((item, update))
                else:
                    parked.append((item, delay))
            self.journal.apply(updates)
        if settled:
            self._settled(dest, settled)
        for item, delay in parked:
            if not item.done:  # dropped meanwhile (changed in sending/): it must not come back
                dest.put(item, time.monotonic() + delay)
        finishing, owed_elsewhere = [], []
        for item, update in settled:
            with item.lock:
                item.settled[dest.name] = update
                item.pending.discard(dest.name)
                if item.pending and not item.done:
                    owed_elsewhere.append(item)
                if item.pending or item.done:
                    continue
                item.done = True
            finishing.append(item)
        self._hand_over(finishing)
        if owed_elsewhere:  # owed only to PACS that are down: they wait in the backlog for their return
            self._let_go(owed_elsewhere)

    def drop_changed(self, item: Item, result: Changed) -> None:
        """Take a file that changed or vanished since its validation out of every queue and the journal, and
        hand it back (the engine's on_changed): validated again as a new version, or forgotten."""
        with item.lock:
            if item.done:  # settled everywhere meanwhile: its move decides
                return
            item.done = True
        for dest in self.destinations.values():
            dest.drop(item)
        # Rows of PACS that confirmed the old version go too: what sits in sending/ now is another file, which
        # no PACS has confirmed; marking it delivered would move an unsent file to sent/.
        with self._lock, self.window.lock:
            self.journal.forget(str(item.path))
            if self.window.items.get(item.path) is item:
                del self.window.items[item.path]
        self.window.remove([])  # room for the refill
        what = "was removed" if result.gone else "changed"
        then = "forgotten" if result.gone else "it is validated again"
        logger.warning("{} {} in sending/ after validation ({}): not sent; {}", item.spool.relative(item.path),
                       what, result.reason, then)
        self._changed(item, result.gone)
