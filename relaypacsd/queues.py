"""One active PACS's queue: ready and waiting files, the UIDs in a request, batches taken by study, health."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from relaypacsd.config import PacsConfig
from relaypacsd.dicomfile import DicomInfo
from relaypacsd.errors import JournalError, PacsError
from relaypacsd.fate import too_old
from relaypacsd.grouping import fill_batch
from relaypacsd.journal import Update
from relaypacsd.models import Part, Sender
from relaypacsd.spool import Spool

if TYPE_CHECKING:
    from relaypacsd.delivery import Engine

BATCH_LINGER = 0.05  # seconds a worker waits for a short batch to fill


@dataclass(eq=False)
class Item:
    """One claimed, valid file waiting in sending/ for one or more destinations."""

    path: Path
    spool: Spool
    info: DicomInfo
    # Monotonic time of its first sighting: the journal's wall-clock first_seen converted once at submit, so
    # a step of the clock (NTP, a resumed VM) neither ages nor rejuvenates a waiting file.
    born: float
    pending: set[str]
    done: bool = False
    first_seen: float = 0.0  # the journal's wall-clock first sighting: only what is written back to it
    lock: threading.Lock = field(default_factory=threading.Lock)
    # What each destination settled (its 'delivered' or 'failed' update), kept in memory as well: rows can
    # vanish under a file (a `relaypacsd retry` racing a claim of the same name), and no rows is no verdict.
    settled: dict[str, Update] = field(default_factory=dict)
    conflicts: dict[str, dict[str, object]] = field(default_factory=dict)  # per destination, for the sidecar
    # The routes that matched it, comma-joined ('' when no [[route]] is configured): sidecar, logs, history.
    route: str = ""
    # The active destinations it goes to (its route's, or every active one); empty: every active destination.
    # The file reaches sent/ once each of these confirmed it.
    targets: frozenset[str] = frozenset()

    @property
    def part(self) -> Part:
        return Part(path=self.path, sop_uid=self.info.sop_instance_uid, size=self.info.size)


class Destination:
    """One active PACS: its queue of ready items, its workers and its health."""

    def __init__(self, config: PacsConfig, sender: Sender, engine: "Engine"):
        self.config = config
        self.name = config.name
        self.sender = sender
        self.engine = engine
        self.ready: deque[Item] = deque()
        self.waiting: dict[Item, float] = {}  # item -> next try (monotonic)
        self.cond = threading.Condition()
        self.healthy = True
        self.down_reason = ""
        self.paused_by: str | None = None  # an operator's hold (relaypacsd.pauses): no new batch while set
        self.back_at = 0.0  # monotonic time it was last found back up
        self.recorded = False  # this run's health is in the journal (its row starts "unknown")
        self.threads: list[threading.Thread] = []
        self.busy = 0
        # SOP Instance UIDs in a request right now: a second file with one of them waits for that answer, so
        # the journal knows which content the PACS got first (a UID conflict is told apart by that order).
        # uid -> [the item, its requests]: the same item put back by a worker's error handler may go again.
        self.in_request: dict[str, list] = {}
        self._uid_wait = False  # a worker waits only because every ready file's UID is in a request

    def put(self, item: Item, at: float = 0.0) -> None:
        """Queue an item now, or park it until `at` (monotonic time) for the sweep."""
        with self.cond:
            if at and at > time.monotonic():
                self.waiting[item] = at
            else:
                self.waiting.pop(item, None)
                self.ready.append(item)
                # Wake a worker for the first item (it lingers to fill the batch) and for each full batch;
                # a wake-up per file only made lingering workers spin on the lock.
                if len(self.ready) == 1 or len(self.ready) % self.engine.config.delivery.batch_max_instances == 0:
                    self.cond.notify()

    def release_due(self, everything: bool = False) -> int:
        """Move waiting items whose time has come (or all of them) to the ready queue."""
        now = time.monotonic()
        with self.cond:
            due = [i for i, t in self.waiting.items() if everything or t <= now]
            for item in due:
                del self.waiting[item]
                self.ready.append(item)
            if due:
                self.cond.notify_all()
        return len(due)

    def take_batch(self, stop: threading.Event) -> list[Item]:
        """Block until a batch is ready (and the PACS healthy); group by study within the caps."""
        cfg = self.engine.config.delivery
        with self.cond:
            while True:
                while not stop.is_set() and (not self.ready or not self.healthy or self.paused_by is not None
                                             or not self.engine.may_send()):
                    # No timeout: put, release_due, set_health and Engine.stop all notify. An idle worker that
                    # woke twice a second only to find nothing was most of an idle daemon's CPU.
                    self.cond.wait()
                if stop.is_set():
                    return []
                # A burst arrives file by file: while other requests are in flight, linger a moment so
                # requests leave full, not one file each. An idle PACS gets what is there at once (the
                # rule of Nagle's algorithm): the first files of a burst need not wait for the rest.
                deadline = time.monotonic() + (BATCH_LINGER if self.busy else 0.0)
                while len(self.ready) < cfg.batch_max_instances and not stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.cond.wait(remaining)
                if self.ready and self.healthy and self.paused_by is None and self.engine.may_send():
                    first = next((i for i in self.ready if not self._held(i)), None)
                    if first is not None:
                        break
                    self._uid_wait = True
                    self.cond.wait(0.5)
            self.ready.remove(first)
            batch = fill_batch(first, self.ready, _info, cfg.batch_max_instances, cfg.batch_max_bytes,
                               lambda item: not self._held(item))
            for item in batch[1:]:
                self.ready.remove(item)
            if self.ready:  # what did not fit: another worker may take it now (nobody else would wake it)
                self.cond.notify()
            self.busy += 1
            for item in batch:
                self.in_request.setdefault(item.info.sop_instance_uid, [item, 0])[1] += 1
            return batch

    def _held(self, item: Item) -> bool:
        """True when another file with this item's SOP Instance UID is in a request to this PACS right now."""
        entry = self.in_request.get(item.info.sop_instance_uid)
        return entry is not None and entry[0] is not item

    def done_with(self, batch: list[Item]) -> None:
        """A worker's request for `batch` has ended (answered, parked or abandoned): release its UIDs."""
        with self.cond:
            self.busy -= 1
            for item in batch:
                entry = self.in_request[item.info.sop_instance_uid]
                entry[1] -= 1
                if not entry[1]:
                    del self.in_request[item.info.sop_instance_uid]
            if self._uid_wait:
                self._uid_wait = False
                self.cond.notify_all()

    def set_health(self, healthy: bool, reason: str = "", failed_since: float | None = None) -> None:
        """Mark the destination up or down; log each change once; wake workers when it comes back.

        `failed_since` (monotonic) is when a failed request began: found back up after that, the PACS is
        not marked down again on that old evidence."""
        with self.cond:
            if not healthy and failed_since is not None and self.healthy and self.back_at > failed_since:
                return
            changed = healthy != self.healthy
            self.healthy, self.down_reason = healthy, ("" if healthy else reason)
            if changed and healthy:
                self.back_at = time.monotonic()
            self.cond.notify_all()
            if changed or not self.recorded:  # under the lock: the journal's health never disagrees with this one's
                try:
                    self.engine.journal.set_health(self.name, healthy, reason)
                    self.recorded = True
                except JournalError as exc:  # the journal away: recorded at the next probe
                    self.recorded = False
                    if self.engine.on_journal_error is None:
                        raise
                    self.engine.on_journal_error(exc)
        if not changed:
            return
        if healthy:
            logger.info("PACS {} at {} is reachable again: resuming deliveries", self.name, self.sender.target)
            self.engine.on_destination_back(self)
        else:
            logger.error("PACS {} at {} is DOWN, deliveries paused, files wait in sending/: {}",
                         self.name, self.sender.target, reason)

    @property
    def paused(self) -> bool:
        return self.paused_by is not None

    def set_paused(self, paused: bool, by: str = "") -> None:
        """Hold the queue (no new batch; requests in flight end) or release it; logged once per change."""
        with self.cond:
            if paused == self.paused:
                return
            self.paused_by = by if paused else None
            self.cond.notify_all()
        if paused:
            logger.warning("PACS {} paused by {}: no new deliveries; its files wait in sending/ (they do not "
                           "expire while paused); `relaypacsd resume {}` resumes", self.name, by or "an operator",
                           self.name)
        else:
            logger.info("PACS {} resumed{}: deliveries go on", self.name, f" by {by}" if by else "")

    def take_expired(self, now: float, max_age: float) -> list[Item]:
        """Take out the items too old to wait longer (fate.too_old): the parked ones and, while the PACS is
        down, the ready ones (a PACS that stays down gets no delivery attempt, so their age counts here). None
        while paused: an operator's hold is no reason to fail a file."""
        with self.cond:
            if self.paused_by is not None:
                return []
            expired = [item for item in self.waiting if too_old(now - item.born, max_age)]
            for item in expired:
                del self.waiting[item]
            if not self.healthy:
                old_ready = [item for item in self.ready if too_old(now - item.born, max_age)]
                for item in old_ready:
                    self.ready.remove(item)
                expired += old_ready
        return expired

    def drop(self, item: Item) -> None:
        """Take an item out of this queue, ready or waiting (a request holding it keeps its UID until done_with)."""
        with self.cond:
            self.waiting.pop(item, None)
            try:
                self.ready.remove(item)
            except ValueError:
                pass

    def wake(self) -> None:
        """Wake every worker (stopping)."""
        with self.cond:
            self.cond.notify_all()

    def check(self) -> tuple[bool, str]:
        """Probe the PACS once: (healthy, the reason when not)."""
        try:
            self.sender.probe()
        except PacsError as exc:
            return False, str(exc)
        except Exception as exc:  # a probe must never kill the scheduler job
            return False, f"{type(exc).__name__}: {exc}"
        return True, ""

    def queued(self) -> int:
        """Files for this PACS: ready, waiting for a retry, in a request, and in the backlog."""
        with self.cond:
            held = len(self.ready) + len(self.waiting) + self.busy
        return held + self.engine.window.waiting(self.name)


def _info(item: Item) -> DicomInfo:
    return item.info
