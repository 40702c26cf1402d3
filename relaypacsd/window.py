"""The engine's active window: at most `delivery.active_window` files held in memory; the others wait in
sending/ with their journal rows (the journal's backlog) and are taken in, a page at a time, as it drains.

Postfix's queue manager keeps at most 20,000 messages active and leaves the rest in its queue files. So here:
a file costs about 2 KB while it is held (its Item, its UIDs and digest, its path), and only its journal rows
while it waits, so a PACS away for a day with a million files queued for it costs disk, not gigabytes. Files
are taken in order: once any wait in the backlog, new files queue behind them there, and the window is
refilled from the journal, the files due earliest first.
"""

from __future__ import annotations

import enum
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from loguru import logger

from relaypacsd.errors import JournalError
from relaypacsd.journal import Backlogged, Journal

if TYPE_CHECKING:
    from relaypacsd.queues import Item
    from relaypacsd.spool import Spool

REFILL_PAGE = 1000  # files per look into the backlog: one index walk and one commit
AHEAD = 1e9  # seconds: "due by now + AHEAD" takes files whose next try is still ahead too (a PACS came back)
ERROR_PAUSE = 5.0  # seconds before the refill looks again after the journal failed


class Admission(enum.Enum):
    """What becomes of a file submitted to the engine."""

    HELD = "held"  # already in the window
    IN = "in"  # a slot is reserved for it
    BACKLOG = "backlog"  # it waits in the backlog: the window is full, or files wait there before it


class Window:
    """The files held in memory (`items`), the slots reserved for files being taken in, what the backlog
    holds, and the refill thread that takes files from the journal as the window drains."""

    def __init__(self, size: int, journal: Journal, dests: Callable[[], dict[str, bool]],
                 take_in: Callable[[list[Backlogged], bool], None]):
        self.size = size
        self.items: dict[Path, "Item"] = {}
        self.lock = threading.Lock()  # guards items, the reservations and the backlog's flags and figures
        self._cond = threading.Condition(self.lock)
        self._journal = journal
        self._dests = dests  # every active PACS -> up: the refill takes files for those that are up
        self._take_in = take_in  # builds and queues the items of a page (the engine's)
        self.step = max(1, min(REFILL_PAGE, size // 4))  # refill once this much room is free: pages stay full
        self._reserved = 0
        self._look = True  # the refill should look into the backlog (at start: what the last run left there)
        self._behind = False  # files due wait in the backlog: new ones queue behind them, in order
        self._ahead = False  # a PACS came back: also take the files whose next try there is still ahead
        # Files sent to the backlog and looks asked for so far: a round that found nothing proves the backlog dry
        # only if neither came during it (a PACS back meanwhile was not among those the round asked).
        self._news = 0
        self._counts: dict[str, int] = {}  # files in the backlog per PACS: counted at each sweep, adjusted between
        self._under: dict[Path, tuple[int, float | None]] = {}  # per watch root: files, earliest first sighting
        self._turn = 0
        # Several gateways (relaypacsd.nodes): a journal error is the node's to report, once per outage, and a lost
        # lease is learnt there too; alone, the refill says it itself.
        self.on_journal_error: Callable[[JournalError], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what is held ---------------------------------------------------------------------------------

    def admit(self, path: Path) -> Admission:
        """Decide where a submitted file goes; IN reserves a slot that `add` (or `cancel`) ends."""
        with self.lock:
            if path in self.items:
                return Admission.HELD
            if self._behind or len(self.items) + self._reserved >= self.size:
                return Admission.BACKLOG
            self._reserved += 1
            return Admission.IN

    def cancel(self) -> None:
        """Give back a reserved slot (the file's journal rows could not be written)."""
        with self.lock:
            self._reserved -= 1

    def add(self, item: "Item", reserved: bool) -> bool:
        """Hold `item`; False (nothing held) when a file of that path is held already."""
        with self.lock:
            if reserved:
                self._reserved -= 1
            if item.path in self.items:
                return False
            self.items[item.path] = item
            return True

    def remove(self, items: list["Item"]) -> None:
        """Let go of items that left the engine; the refill takes files in once there is a page's room."""
        with self.lock:
            for item in items:
                if self.items.get(item.path) is item:
                    del self.items[item.path]
            if self._look and self._room() >= self.step:
                self._cond.notify()

    def known(self, path: Path) -> bool:
        """True if the window holds this file."""
        with self.lock:
            return path in self.items

    def held(self) -> int:
        """Files held in memory."""
        with self.lock:
            return len(self.items)

    def _room(self) -> int:
        return self.size - len(self.items) - self._reserved

    # -- the backlog ------------------------------------------------------------------------------------

    def spilled(self, dests: list[str]) -> None:
        """A file was left in the backlog, owed to `dests`."""
        with self.lock:
            self._news += 1
            self._look = self._behind = True
            for d in dests:
                self._counts[d] = self._counts.get(d, 0) + 1
            if self._room() >= self.step:
                self._cond.notify()

    def taken(self, dests: list[str]) -> None:
        """A file owed to `dests` left the backlog (the figures until the next count)."""
        with self.lock:
            for d in dests:
                self._counts[d] = max(0, self._counts.get(d, 0) - 1)

    def waiting(self, dest: str | None = None) -> int:
        """Files in the backlog owed to `dest` (None: to any PACS, counted once per PACS: an estimate)."""
        with self.lock:
            return self._counts.get(dest, 0) if dest is not None else max(self._counts.values(), default=0)

    def wanted(self) -> bool:
        """True when files wait in the backlog for a PACS that is up: held files none can send should make room."""
        with self.lock:
            counts = dict(self._counts)
        return any(counts.get(name, 0) > 0 for name, up in self._dests().items() if up)

    def poke(self, ahead: bool = False) -> None:
        """Look into the backlog again (a sweep: next tries may have come; `ahead`: a PACS came back, so its
        files go now, however far ahead their next try was)."""
        with self.lock:
            self._news += 1
            self._look = True
            self._ahead = self._ahead or ahead
            self._cond.notify()

    def recount(self, spools: Iterable["Spool"] = ()) -> None:
        """Count the backlog in the journal, per PACS and per watch root (at each sweep: the figures per PACS
        between two counts are adjusted estimates; per root, the dashboard's, they are the last count's)."""
        counts = self._journal.backlog_counts(list(self._dests()))
        under = {s.root: self._journal.backlog_under(str(s.sending)) for s in spools} if any(counts.values()) else {}
        with self.lock:
            self._counts, self._under = counts, under

    def under(self) -> dict[Path, tuple[int, float | None]]:
        """Per watch root: files in the backlog and their earliest first sighting, at the last count."""
        with self.lock:
            return dict(self._under)

    # -- the refill thread --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the refill thread ("refill")."""
        self._thread = threading.Thread(target=self._run, name="refill", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the refill thread (a page being taken in finishes first)."""
        self._stop.set()
        with self.lock:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        """True unless the thread was started and has ended."""
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                while not self._stop.is_set() and not (self._look and self._room() >= self.step):
                    self._cond.wait()
            if self._stop.is_set():
                return
            try:
                self.refill()
            except JournalError as exc:
                if self.on_journal_error is None:
                    logger.error("taking files from the backlog failed ({}); trying again in {:.0f} s", exc, ERROR_PAUSE)
                else:
                    self.on_journal_error(exc)
                self._stop.wait(ERROR_PAUSE)
            except Exception:  # a bug must not end the thread: the files wait in sending/ with their rows
                logger.exception("taking files from the backlog failed unexpectedly")
                self._stop.wait(ERROR_PAUSE)

    def refill(self) -> int:
        """Fill the window from the backlog, a page per PACS in turn, until it is full or nothing is due; return
        how many files were taken. Run by the refill thread (and by tests, directly)."""
        with self.lock:
            ahead, news = self._ahead, self._news
        dests = [name for name, up in self._dests().items() if up]  # a PACS that is down gets nothing now
        dry: set[str] = set()
        count = 0
        while len(dry) < len(dests) and not self._stop.is_set():
            with self.lock:
                room = self._room()
            if room < 1 or (count and room < self.step):
                break  # full: the next wake-up comes from remove()
            dest = dests[self._turn % len(dests)]
            self._turn += 1
            if dest in dry:
                continue
            asked = min(REFILL_PAGE, room)
            page = self._journal.take_backlog(dest, time.time() + (AHEAD if ahead else 0.0), asked)
            if len(page) < asked:
                dry.add(dest)
            if page:
                self._take_in(page, ahead)
                count += len(page)
        with self.lock:
            if len(dry) == len(dests) and self._news == news:
                # Nothing due is left: until a file is spilled, a sweep or a PACS's return.
                self._look = self._behind = self._ahead = False
            elif len(dry) < len(dests):
                self._behind = True  # full with files due left behind: the next ones queue after them
        return count
