"""Deliver claimed files to every active destination: take batches, send, have each instance's outcome recorded,
sweep and probe. The per-PACS queues live in queues.py, one batch's delivery in batches.py, the UID-conflict check
in conflicts.py, the journal writes that fate.py decides in recording.py, the moves in finishing.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from loguru import logger

from relaypacsd.batches import Changed, backoff, deliver_parts, send_safely
from relaypacsd.config import Config
from relaypacsd.conflicts import CONFLICT_NEXT_STEP, UidChecked
from relaypacsd.dicomfile import DicomInfo
from relaypacsd.errors import JournalError
from relaypacsd.finishing import Finisher
from relaypacsd.holding import Holder, Valid
from relaypacsd.journal import Journal, Update
from relaypacsd.models import Part, Sender
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.queues import Destination, Item
from relaypacsd.recording import Recorder
from relaypacsd.records import log_attempt
from relaypacsd.routing import RouteDecision, Unrouted
from relaypacsd.spool import Spool
from relaypacsd.window import Window

# Names callers and tests import from here, now living in the modules above.
__all__ = ["Engine", "Item", "Destination", "Changed", "backoff", "deliver_parts", "send_safely", "CONFLICT_NEXT_STEP"]


class Engine:
    """Wires destinations, journal and spool moves: makes the journal writes and folder moves that fate.py decides."""

    def __init__(self, config: Config, journal: Journal, senders: dict[str, Sender],
                 sleep: Callable[[float], bool] | None = None, spools: list[Spool] | None = None,
                 revalidate: Callable[[Spool, Path], None] | None = None):
        self.config = config
        self.journal = journal
        self.stop_event = threading.Event()
        self.destinations = {name: Destination(config.pacs[name], s, self) for name, s in senders.items()}
        self._sleep = sleep or self.stop_event.wait
        # The files held in memory, at most delivery.active_window; the others wait in the journal's backlog.
        self.holder = Holder(self, spools or [], revalidate)
        self.window = Window(config.delivery.active_window, journal,
                             lambda: {n: d.healthy for n, d in self.destinations.items()}, self.holder.take_in)
        self._items = self.window.items
        self._items_lock = self.window.lock
        self.finisher = Finisher(journal, self.destinations, self._untrack, self._finished)
        # Through the engine's methods, so tests that replace _hand_over see the hand-overs.
        self.recorder = Recorder(config, journal, self.window, self.destinations,
                                 lambda items: self._hand_over(items), self.let_go, self._settled, self._changed)
        self.on_finished: Callable[[Item, str], None] | None = None
        # A file changed or vanished in sending/ after validation, dropped here: (item, gone).
        self.on_changed: Callable[[Item, bool], None] | None = None
        # Observer of every send attempt (metrics): (destination, items, results, HTTP status, ms, attempt).
        self.on_batch: Callable[[Destination, list[Item], list[InstanceResult], int | None, float, int], None] | None = None
        # Several gateways (relaypacsd.nodes): no batch leaves while the journal is away or this node's lease is not
        # fresh (the answer could not be recorded); a journal error is reported once, by the node.
        self.may_send: Callable[[], bool] = lambda: True
        self.on_journal_error: Callable[[JournalError], None] | None = None
        # Observer of each batch's settled instances (audit messages): (destination, [(item, its update)]).
        self.on_settled: Callable[[Destination, list[tuple[Item, Update]]], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the finishing thread and the workers of every destination."""
        self.journal.begin_run(self.destinations)  # status: health unknown until this run finds out
        self.finisher.start()
        self.window.start()
        for dest in self.destinations.values():
            for i in range(self.config.delivery.workers_per_pacs):
                t = threading.Thread(target=self._worker, args=(dest,), name=f"deliver-{dest.name}-{i}", daemon=True)
                t.start()
                dest.threads.append(t)

    def stop(self, timeout: float = 30.0, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Stop taking batches; wait for batches in flight (one request each: no retry or split starts once
        stopping) until they end, `timeout` s pass or give_up() says so (it is called every 0.2 s). Their
        files stay in sending/ if abandoned. Returns True when every worker has ended."""
        self.stop_event.set()
        self.window.stop()  # nothing more is taken in from the backlog
        for dest in self.destinations.values():
            dest.wake()
        started = time.monotonic()
        deadline = started + timeout
        said = False
        while True:
            alive = [(d, t) for d in self.destinations.values() for t in d.threads if t.is_alive()]
            now = time.monotonic()
            if not alive or now >= deadline or give_up():
                break
            if not said and now - started > 5:
                said = True
                logger.warning("waiting for {} request(s) still in flight to {} (each ends by its timeouts)",
                               len(alive), ", ".join(sorted({f"{d.name} at {d.sender.target}" for d, _ in alive})))
            alive[0][1].join(max(0.01, min(0.2, deadline - now)))
        # After the workers: it finishes what they settled. Its work is local renames and one commit: give it
        # time even when the workers used up the deadline, so the journal is not closed under a half-finished group.
        self.finisher.stop(max(5.0, deadline - time.monotonic()))
        return not alive

    def alive(self) -> bool:
        """True while every worker thread and the finishing thread run."""
        return (all(t.is_alive() for d in self.destinations.values() for t in d.threads)
                and self.finisher.alive() and self.window.alive())

    def in_flight(self) -> int:
        """Files known to the engine and not yet in sent/ or failed/: those held, and those in the backlog."""
        return self.window.held() + self.window.waiting()

    def backlog(self) -> int:
        """Files waiting in the journal's backlog, outside the active window (counted at each sweep)."""
        return self.window.waiting()

    # -- intake ------------------------------------------------------------------------------------

    def submit(self, path: Path, spool: Spool, info: DicomInfo, route: RouteDecision | None = None) -> None:
        """Hold a valid file in sending/ and queue it where it is owed, or leave it in the backlog when the window
        is full (holding.Holder.submit); Unrouted when it is left with no active destination."""
        self.holder.submit(path, spool, info, route)

    def submit_many(self, files: list[Valid]) -> list[Unrouted | None]:
        """`submit` for validation's group of files, one journal commit: for each, None or its Unrouted."""
        return self.holder.submit_many(files)

    def known(self, path: Path) -> bool:
        """True if the engine holds this file in its window (one in the backlog is only in the journal)."""
        return self.window.known(path)

    def _untrack(self, items: list[Item]) -> None:
        self.window.remove(items)

    def _finished(self, item: Item, folder: str) -> None:
        if self.on_finished:
            self.on_finished(item, folder)

    # The finishing thread's door, kept on the engine so tests can hold settled items back.
    def _hand_over(self, items: list[Item]) -> None:
        self.finisher.hand_over(items)

    def _finish(self, items: list[Item]) -> None:
        self.finisher.finish(items)

    # -- delivery ----------------------------------------------------------------------------------

    def _worker(self, dest: Destination) -> None:
        while not self.stop_event.is_set():
            batch = dest.take_batch(self.stop_event)
            if not batch:
                continue
            try:
                self._deliver(dest, batch)
            except Exception as exc:  # a bug must not kill the worker: the files wait for the sweep
                if isinstance(exc, JournalError) and self.on_journal_error is not None:
                    self.on_journal_error(exc)  # the answer is not recorded: sent again later (a duplicate)
                else:
                    logger.exception("PACS forward {}: unexpected error; {} file(s) wait for the retry sweep",
                                     dest.name, len(batch))
                for item in batch:
                    with item.lock:  # only what this PACS still owes: never a file it already confirmed
                        owed = not item.done and dest.name in item.pending
                    if owed and self.known(item.path):
                        dest.put(item, time.monotonic() + self.config.delivery.retry_sweep_interval)
            finally:
                dest.done_with(batch)

    def _deliver(self, dest: Destination, batch: list[Item]) -> None:
        """Send a batch with quick retries for what may succeed soon; split batches that failed whole."""
        cfg = self.config.delivery
        by_part = {item.part: item for item in batch}
        went_down: list[tuple[str, float]] = []
        last_ms: list[float] = [0.0]  # the last request's: what on_results settles comes from it

        def on_attempt(parts: list[Part], results: list[InstanceResult], status: int | None, ms: float,
                       attempt: int, down: str | None) -> None:
            last_ms[0] = ms
            if down is not None:
                went_down.append((down, time.monotonic() - ms / 1000))
            self._log_batch(dest, [by_part[p] for p in parts], results, status, ms, attempt)

        def on_results(parts: list[Part], results: list[InstanceResult]) -> None:
            pairs = [(by_part[p], r) for p, r in zip(parts, results)]
            for item, result in pairs:
                if isinstance(result, Changed):
                    self._drop_changed(item, result)
            self._record_many(dest, [(i, r) for i, r in pairs if not isinstance(r, Changed)], last_ms[0])

        deliver_parts(UidChecked(self.journal, dest, by_part), list(by_part), cfg.retry_attempts, cfg.retry_delay,
                      self._sleep, on_results, on_attempt=on_attempt,
                      may_retry=lambda: dest.healthy and not self.stop_event.is_set())
        if went_down:
            # Only once the batch's files are parked: a probe that found the PACS back between marking it
            # down and parking them would have released nothing, and they would wait a sweep interval.
            reason, since = went_down[-1]
            dest.set_health(False, reason, failed_since=since)

    def _log_batch(self, dest: Destination, items: list[Item], results: list[InstanceResult],
                   status: int | None, ms: float, attempt: int) -> None:
        log_attempt(dest.name, items, results, status, ms, attempt)
        if self.on_batch is not None:
            try:
                self.on_batch(dest, items, results, status, ms, attempt)
            except Exception:  # an observer must never break delivery
                logger.exception("batch observer failed")

    # -- outcomes -> states (recording.Recorder; kept as methods so tests can slow or watch them) ------------

    def _record_many(self, dest: Destination, pairs: list[tuple[Item, InstanceResult]],
                     duration_ms: float | None = None) -> None:
        self.recorder.record(dest, pairs, duration_ms)

    def _drop_changed(self, item: Item, result: Changed) -> None:
        self.recorder.drop_changed(item, result)

    def _settled(self, dest: Destination, settled: list[tuple[Item, Update]]) -> None:
        if self.on_settled is not None:
            try:
                self.on_settled(dest, settled)
            except Exception:  # an observer must never break delivery
                logger.exception("settled observer failed")

    def _changed(self, item: Item, gone: bool) -> None:
        if self.on_changed:
            self.on_changed(item, gone)

    # -- sweep and health --------------------------------------------------------------------------

    def sweep(self) -> int:
        """Release every waiting item whose next try has come, at healthy destinations; fail what is too old."""
        released = 0
        max_age, now = self.config.delivery.max_age_hours * 3600, time.monotonic()
        for dest in self.destinations.values():
            # Parked files and, while the PACS is down, those that arrived meanwhile: _record_many then fails
            # them as too old (instance_fate).
            expired = dest.take_expired(now, max_age)
            if expired:
                why = f"PACS down: {dest.down_reason}" if not dest.healthy else "not delivered in time"
                self._record_many(dest, [(item, InstanceResult(item.info.sop_instance_uid, Outcome.TRANSIENT,
                                                               None, None, why)) for item in expired])
            if dest.healthy:
                released += dest.release_due()
        self.window.recount(self.holder.spools)
        if self.window.wanted():  # held files no PACS can send soon make room for those one can
            self.let_go(list(self._items.values()))
        self.window.poke()  # files in the backlog whose next try has come
        return released

    def let_go(self, items: list[Item]) -> int:
        """Put held files that no PACS can send soon back in the backlog (holding.Holder.let_go)."""
        return self.holder.let_go(items)

    def probe(self) -> None:
        """Probe every destination once and update its health (not once stopping: the journal may be closed)."""
        for dest in self.destinations.values():
            healthy, reason = dest.check()
            if self.stop_event.is_set():
                return
            dest.set_health(healthy, reason)

    def wake_all(self) -> None:
        """The journal is usable again (relaypacsd.nodes): workers held back look at their queues."""
        for dest in self.destinations.values():
            dest.wake()

    def on_destination_back(self, dest: Destination) -> None:
        """A destination came back: everything waiting for it goes now, not at its next sweep (in the backlog
        too: the refill takes those due later as well)."""
        dest.release_due(everything=True)
        self.window.poke(ahead=True)
