"""The finishing thread: moves files that every PACS has settled to sent/ or failed/ (as fate.file_fate says),
writes their sidecars and forgets their journal rows, one fsync per folder for what queued up together."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Mapping

from loguru import logger

from relaypacsd.batches import hex_code
from relaypacsd.conflicts import CONFLICT_NEXT_STEP
from relaypacsd.fate import file_fate
from relaypacsd.errors import JournalError
from relaypacsd.journal import DeliveryRow, Journal
from relaypacsd.queues import Destination, Item
from relaypacsd.renames import sync_dirs
from relaypacsd.sidecars import now_iso


class Finisher:
    """Settled files go to one finishing thread (renames, fsync, journal), so a worker sends its next batch at
    once: batches that a PACS answers together no longer leave it idle while all the workers finish at the
    same time. Files queued meanwhile share one fsync."""

    def __init__(self, journal: Journal, destinations: Mapping[str, Destination],
                 untrack: Callable[[list[Item]], None], finished: Callable[[Item, str], None]):
        self.journal = journal
        self.destinations = destinations
        self._untrack = untrack  # the engine stops tracking these items
        self._finished = finished  # one item moved to its folder ('sent' or 'failed')
        self._queue: queue.SimpleQueue[list[Item] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Several gateways (relaypacsd.nodes): a move waits while this node's lease is not fresh or the journal is
        # away; False (lost, stopping) means let go, moving nothing: a node taken over never moves another's file.
        self.may_move: Callable[[], bool] = lambda: True
        self.on_journal_error: Callable[[JournalError], None] | None = None

    def start(self) -> None:
        """Start the finishing thread ("finish")."""
        self._thread = threading.Thread(target=self._loop, name="finish", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish what is queued, then end; wait up to `timeout` s (called after the workers have ended)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def alive(self) -> bool:
        """True unless the thread was started and has ended."""
        return self._thread is None or self._thread.is_alive()

    def hand_over(self, items: list[Item]) -> None:
        """Give settled items to the finishing thread; finish them here when it does not run."""
        if not items:
            return
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(items)
        else:  # not started (one-off use), or already stopped
            self.finish(items)

    def _loop(self) -> None:
        while True:
            group = self._queue.get()
            last = group is None
            group = group or []
            while not last:  # what queued up meanwhile shares this fsync
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                last = more is None
                group.extend(more or [])
            if group and not self.may_move():
                self._untrack(group)  # they stay in sending/: this node's next run (or their new owner) takes them
            elif group:
                try:
                    self.finish(group)
                except JournalError as exc:  # away: said once by the node; the sweep takes them up again
                    if self.on_journal_error is None:
                        raise
                    self.on_journal_error(exc)
                    self._untrack(group)
                except Exception:  # e.g. the journal failed: untracked, the sweep takes them up again
                    logger.exception("finishing {} settled file(s) failed; the next retry sweep takes them up",
                                     len(group))
                    self._untrack(group)
            if last:
                return

    def finish(self, items: list[Item]) -> None:
        """Every destination has settled for these items: sent/ when all confirmed, else failed/ with the
        whole story. One journal query, one commit and one fsync per folder for the group."""
        if not items:
            return
        rows = self.journal.rows_of([str(i.path) for i in items])
        moved: list[Path] = []
        finished: list[tuple[Item, str]] = []
        stuck: list[tuple[Item, OSError]] = []
        gone: list[Item] = []
        for item in items:
            folder = self._verdict(item, rows)
            if folder is None:
                continue
            failed = folder == "failed"
            try:
                if failed:
                    moved.append(self._fail_file(item, rows[str(item.path)]))
                else:
                    moved.append(item.spool.finish(item.path, "sent", sync=False))
            except FileNotFoundError:
                gone.append(item)
            except OSError as exc:
                stuck.append((item, exc))
            else:
                finished.append((item, folder))
        sync_dirs(moved)
        # Forgotten only after the move: a move that failed keeps the rows, so the sweep retries the move
        # and never the sending. Killed in between, the rows outlive the file; start-up settles them
        # (recovery.settle_journal).
        self.journal.forget(*(str(i.path) for i, folder in finished if folder == "sent"), *(str(i.path) for i in gone))
        self._untrack(items)
        for item in gone:
            logger.warning("PACS forward: {} was removed from sending/ by someone else before it could be moved "
                           "(every PACS had settled it)", item.spool.relative(item.path))
        for item, exc in stuck:
            logger.error("PACS forward: {} is settled but could not be moved out of sending/: {}; it stays "
                         "there and the next retry sweep moves it (check the spool's permissions and free "
                         "space)", item.spool.relative(item.path), exc)
        for item, folder in finished:
            self._finished(item, folder)

    def _verdict(self, item: Item, rows: dict[str, dict[str, DeliveryRow]]) -> str | None:
        """The file's folder from its rows and the engine's memory (fate.file_fate): 'sent', 'failed', or None
        when a destination's verdict is lost (no row, no memory): it then stays in sending/.

        Rows that vanished under a settled file are written back from memory (`rows` is updated), so its
        sidecar and a later retry still know which PACS have it."""
        key = str(item.path)
        have = rows[key]
        with item.lock:
            memory = dict(item.settled)
        missing = [u for d, u in memory.items() if d not in have]
        states = {d: r.state for d, r in have.items()}
        for d, u in memory.items():  # a failure in either counts
            if d not in states or u.state == "failed":
                states[d] = u.state
        targets = item.targets or self.destinations  # its route's destinations, or every active one
        folder = file_fate(states, targets)
        if missing:
            logger.warning("PACS forward: the journal rows of {} for {} went missing after the PACS answered "
                           "(removed by a `relaypacsd retry` racing a claim of this name?); deciding from the "
                           "daemon's memory: {}", item.spool.relative(item.path), ", ".join(u.dest for u in missing),
                           "failed" if folder == "failed" else "delivered")
            if folder != "sent":  # staying in sending/ too: a PACS that confirmed it must not get it again
                self.journal.restore(key, item.info.sop_instance_uid, item.first_seen, missing, route=item.route)
                rows[key] = self.journal.rows(key)
        if folder is None:
            lost = sorted(d for d in targets if d not in states)
            logger.warning("PACS forward: {} has no journal row for {} and was not settled there by this run: it "
                           "stays in sending/ and the next retry sweep sends it there again (never taken as sent "
                           "without a confirmation)", item.spool.relative(item.path), ", ".join(lost))
        return folder

    def _fail_file(self, item: Item, rows: dict[str, DeliveryRow]) -> Path:
        """Move a file that some PACS rejected to failed/, its sidecar holding every PACS's story."""
        key = str(item.path)
        failed = {d: r for d, r in rows.items() if r.state == "failed"}
        conflicted = self.journal.conflicted(key) & set(failed)
        sidecar = {
            "reason": "; ".join(f"{d}: {r.last_error}" for d, r in failed.items()),
            "stage": "delivery",
            "time": now_iso(),
            "sop_instance_uid": item.info.sop_instance_uid,
            "study_instance_uid": item.info.study_instance_uid,
            "pacs": {d: {"state": r.state, "attempts": r.attempts, "reason_code": hex_code(r.last_code),
                         "error": r.last_error} for d, r in rows.items()},
            "history": self.journal.history(key),
            **({"route": item.route} if item.route else {}),
            "next_step": "fix the cause, then `relaypacsd retry FILE` sends it again to the PACS that still need it",
        }
        if conflicted:
            # Memory of this run when it has it; after a restart, the journal's words.
            sidecar["uid_conflict"] = {d: item.conflicts.get(d) or {"detail": failed[d].last_error} for d in conflicted}
            sidecar["next_step"] = CONFLICT_NEXT_STEP
        new = item.spool.finish(item.path, "failed", sidecar, sync=False)
        self.journal.rename(key, str(new))
        return new
