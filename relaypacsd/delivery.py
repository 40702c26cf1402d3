"""Deliver claimed files to every active destination: batch, send, reconcile each instance, decide the next state."""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loguru import logger

from relaypacsd.config import Config, PacsConfig
from relaypacsd.dicomfile import DicomInfo
from relaypacsd.errors import DestinationProblem, PacsError, PacsUnreachable, RelayPacsError
from relaypacsd.fate import FailReason, Verdict, file_fate, instance_fate, owed, too_old
from relaypacsd.journal import DeliveryRow, Journal, KnownInstance, Update
from relaypacsd.models import Part, Sender
from relaypacsd.outcomes import InstanceResult, Outcome, results_for_error
from relaypacsd.spool import Spool, now_iso, sync_dirs
from relaypacsd.timefmt import iso_time

BATCH_LINGER = 0.05  # seconds a worker waits for a short batch to fill


@dataclass(frozen=True)
class Changed(InstanceResult):
    """Not sent: the file is no longer the one validated (its size differs), or it is gone. Sending it again
    cannot help: it is validated again (a new version), or forgotten."""

    gone: bool = False


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
                while not stop.is_set() and (not self.ready or not self.healthy):
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
                if self.ready and self.healthy:
                    first = next((i for i in self.ready if not self._held(i)), None)
                    if first is not None:
                        break
                    self._uid_wait = True
                    self.cond.wait(0.5)
            self.ready.remove(first)
            batch, size = [first], first.info.size
            study = first.info.study_instance_uid
            # The PACS answers per SOP Instance UID: two files with one UID in a request (a corrected
            # resend) could not be told apart, so a second one waits for the next batch.
            uids = {first.info.sop_instance_uid}
            # Same study first, then anything else, so requests stay full under mixed traffic.
            for same_study in (True, False):
                for item in list(self.ready):
                    if len(batch) >= cfg.batch_max_instances:
                        break
                    if same_study != (item.info.study_instance_uid == study):
                        continue
                    if size + item.info.size > cfg.batch_max_bytes or item.info.sop_instance_uid in uids:
                        continue
                    if self._held(item):
                        continue
                    self.ready.remove(item)
                    batch.append(item)
                    uids.add(item.info.sop_instance_uid)
                    size += item.info.size
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
                self.engine.journal.set_health(self.name, healthy, reason)
                self.recorded = True
        if not changed:
            return
        if healthy:
            logger.info("PACS {} at {} is reachable again: resuming deliveries", self.name, self.sender.target)
            self.engine.on_destination_back(self)
        else:
            logger.error("PACS {} at {} is DOWN, deliveries paused, files wait in sending/: {}",
                         self.name, self.sender.target, reason)

    def queued(self) -> int:
        with self.cond:
            return len(self.ready) + len(self.waiting) + self.busy


class Engine:
    """Wires destinations, journal and spool moves: makes the journal writes and folder moves that fate.py decides."""

    def __init__(self, config: Config, journal: Journal, senders: dict[str, Sender],
                 sleep: Callable[[float], bool] | None = None):
        self.config = config
        self.journal = journal
        self.stop_event = threading.Event()
        self.destinations = {name: Destination(config.pacs[name], s, self) for name, s in senders.items()}
        self._sleep = sleep or self.stop_event.wait
        self._items: dict[Path, Item] = {}
        self._items_lock = threading.Lock()
        self._recording = threading.Lock()  # see _record_many
        # Settled files go to one finishing thread (renames, fsync, journal), so a worker sends its next
        # batch at once: batches that a PACS answers together no longer leave it idle while all the
        # workers finish at the same time. Files queued meanwhile share one fsync.
        self._finishing: queue.SimpleQueue[list[Item] | None] = queue.SimpleQueue()
        self._finisher: threading.Thread | None = None
        self.on_finished: Callable[[Item, str], None] | None = None
        # A file changed or vanished in sending/ after validation, dropped here: (item, gone).
        self.on_changed: Callable[[Item, bool], None] | None = None
        # Observer of every send attempt (metrics): (destination, items, results, HTTP status, ms, attempt).
        self.on_batch: Callable[[Destination, list[Item], list[InstanceResult], int | None, float, int], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the finishing thread and the workers of every destination."""
        self.journal.begin_run(self.destinations)  # status: health unknown until this run finds out
        self._finisher = threading.Thread(target=self._finish_loop, name="finish", daemon=True)
        self._finisher.start()
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
        for dest in self.destinations.values():
            with dest.cond:
                dest.cond.notify_all()
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
        if self._finisher is not None:  # after the workers: it finishes what they settled
            self._finishing.put(None)
            # Its work is local renames and one commit: give it time even when the workers used up the
            # deadline, so the journal is not closed under a half-finished group.
            self._finisher.join(max(5.0, deadline - time.monotonic()))
        return not alive

    def alive(self) -> bool:
        """True while every worker thread and the finishing thread run."""
        return (all(t.is_alive() for d in self.destinations.values() for t in d.threads)
                and (self._finisher is None or self._finisher.is_alive()))

    def in_flight(self) -> int:
        """Files known to the engine and not yet in sent/ or failed/."""
        with self._items_lock:
            return len(self._items)

    # -- intake ------------------------------------------------------------------------------------

    def submit(self, path: Path, spool: Spool, info: DicomInfo) -> None:
        """Take a valid file in sending/ and queue it for every destination that has not confirmed it."""
        key = str(path)
        rows = self.journal.ensure(key, self.destinations, sop=info.sop_instance_uid)
        now_wall, now_mono = time.time(), time.monotonic()
        first_seen = min((r.first_seen for r in rows.values()), default=now_wall)
        born = now_mono - max(0.0, now_wall - first_seen)
        pending = {d for d, r in rows.items() if d in self.destinations and owed(r.state)}
        item = Item(path=path, spool=spool, info=info, born=born, pending=set(pending), first_seen=first_seen)
        with self._items_lock:
            if path in self._items:
                return  # already queued (a rescan of sending/ found it again)
            self._items[path] = item
        if not self.destinations:
            return  # PACS_ENABLED=false: validated and parked in sending/
        if not pending:
            item.done = True
            self._hand_over([item])
            return
        for name in pending:
            row = rows[name]
            at = now_mono + max(0.0, row.next_try - now_wall) if row.state == "waiting" else 0.0
            self.destinations[name].put(item, at)

    def known(self, path: Path) -> bool:
        """True if the engine already tracks this file."""
        with self._items_lock:
            return path in self._items

    # -- delivery ----------------------------------------------------------------------------------

    def _worker(self, dest: Destination) -> None:
        while not self.stop_event.is_set():
            batch = dest.take_batch(self.stop_event)
            if not batch:
                continue
            try:
                self._deliver(dest, batch)
            except Exception:  # a bug must not kill the worker: the files wait for the sweep
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

        def on_attempt(parts: list[Part], results: list[InstanceResult], status: int | None, ms: float,
                       attempt: int, down: str | None) -> None:
            if down is not None:
                went_down.append((down, time.monotonic() - ms / 1000))
            self._log_batch(dest, [by_part[p] for p in parts], results, status, ms, attempt)

        def on_results(parts: list[Part], results: list[InstanceResult]) -> None:
            pairs = [(by_part[p], r) for p, r in zip(parts, results)]
            for item, result in pairs:
                if isinstance(result, Changed):
                    self._drop_changed(item, result)
            self._record_many(dest, [(i, r) for i, r in pairs if not isinstance(r, Changed)])

        deliver_parts(_UidChecked(self, dest, by_part), list(by_part), cfg.retry_attempts, cfg.retry_delay,
                      self._sleep, on_results, on_attempt=on_attempt,
                      may_retry=lambda: dest.healthy and not self.stop_event.is_set())
        if went_down:
            # Only once the batch's files are parked: a probe that found the PACS back between marking it
            # down and parking them would have released nothing, and they would wait a sweep interval.
            reason, since = went_down[-1]
            dest.set_health(False, reason, failed_since=since)

    def _log_batch(self, dest: Destination, items: list[Item], results: list[InstanceResult],
                   status: int | None, ms: float, attempt: int) -> None:
        by_outcome: dict[Outcome, list[tuple[Item, InstanceResult]]] = {}
        for item, result in zip(items, results):
            by_outcome.setdefault(result.outcome, []).append((item, result))
        http = f"HTTP {status}" if status is not None else "no answer"
        for outcome, pairs in by_outcome.items():
            files = ",".join(str(i.spool.relative(i.path)) for i, _ in pairs)
            uids = ",".join(i.info.sop_instance_uid for i, _ in pairs)
            reason = pairs[0][1].reason
            if outcome.delivered:
                logger.info("PACS forward {} {}: {} file(s) in {:.0f} ms ({}) files={} uids={}", dest.name,
                            outcome.value, len(pairs), ms, http, files, uids)
            else:
                logger.warning("PACS forward {} {}: {} file(s) not delivered (attempt {}, {} ms, {}): {} files={} uids={}",
                               dest.name, outcome.value, len(pairs), attempt, round(ms), http, reason, files, uids)
        if self.on_batch is not None:
            try:
                self.on_batch(dest, items, results, status, ms, attempt)
            except Exception:  # an observer must never break delivery
                logger.exception("batch observer failed")

    # -- outcomes -> states --------------------------------------------------------------------------

    def _record_many(self, dest: Destination, pairs: list[tuple[Item, InstanceResult]]) -> None:
        """Turn each instance's outcome at one destination into journal state (one commit) and, for the
        files that have settled everywhere, a folder move."""
        cfg = self.config.delivery
        # The look at which files are still tracked and the commit are one step for _drop_changed: a file
        # dropped in between gets a new version's rows under its name, which this answer must not update.
        with self._recording:
            with self._items_lock:  # a file dropped meanwhile (it changed): its answer is about an old version
                dropped = [(item, r) for item, r in pairs if self._items.get(item.path) is not item]
                pairs = [(item, r) for item, r in pairs if self._items.get(item.path) is item]
            # Yet the PACS has those old bytes under the UID now: remembered, so the new version conflicts there.
            self.journal.remember([Update(str(item.path), dest.name, "delivered", r.outcome.value,
                                          sop=item.info.sop_instance_uid, digest=item.info.digest)
                                   for item, r in dropped if r.outcome.delivered])
            if not pairs:
                return
            rows = self.journal.rows_at(dest.name, [str(item.path) for item, _ in pairs])
            updates: list[Update] = []
            settled: list[tuple[Item, Update]] = []
            parked: list[tuple[Item, float]] = []
            for item, result in pairs:
                key = str(item.path)
                row = rows.get(key)
                detail = _detail(result)
                fate = instance_fate(result.outcome, (row.attempts if row else 0) + 1,
                                     time.monotonic() - item.born, cfg.max_age_hours * 3600)
                attempts = fate.attempts
                if fate.verdict is Verdict.DELIVERED:
                    updates.append(Update(key, dest.name, "delivered", result.outcome.value, detail, attempts,
                                          code=result.reason_code, sop=item.info.sop_instance_uid,
                                          digest=item.info.digest))
                elif fate.reason is FailReason.UID_CONFLICT:
                    updates.append(Update(key, dest.name, "failed", result.outcome.value, detail, attempts,
                                          code=result.reason_code))
                    logger.error("PACS forward {} UID conflict: {} uid={}: {}", dest.name, item.spool.relative(item.path),
                                 item.info.sop_instance_uid, result.reason)
                elif fate.verdict is Verdict.FAILED:
                    if fate.reason is FailReason.TOO_OLD:
                        detail = f"gave up after {cfg.max_age_hours:g} h of retries; last error: {detail}"
                    updates.append(Update(key, dest.name, "failed", "failed", detail, attempts, code=result.reason_code))
                    logger.error("PACS forward {} failed: {} uid={}: {}", dest.name, item.spool.relative(item.path),
                                 item.info.sop_instance_uid, detail)
                else:
                    delay = backoff(cfg.retry_delay, attempts, cfg.retry_backoff_max)
                    updates.append(Update(key, dest.name, "waiting", result.outcome.value, detail, attempts,
                                          next_try=time.time() + delay, code=result.reason_code))
                    parked.append((item, delay))
                    continue
                settled.append((item, updates[-1]))
            self.journal.apply(updates)
        for item, delay in parked:
            if not item.done:  # dropped meanwhile (changed in sending/): it must not come back
                dest.put(item, time.monotonic() + delay)
        finishing = []
        for item, update in settled:
            with item.lock:
                item.settled[dest.name] = update
                item.pending.discard(dest.name)
                if item.pending or item.done:
                    continue
                item.done = True
            finishing.append(item)
        self._hand_over(finishing)

    def check_uids(self, dest: Destination, items: list[Item], results: list[InstanceResult]) -> list[InstanceResult]:
        """The PACS's answer with each confirmation of a UID it holds for other content turned into a conflict.

        No other request to this PACS holds these UIDs (Destination.in_request): this look, made before the
        answer is logged or recorded, and the commit that follows see every earlier confirmation of them."""
        uids = [i.info.sop_instance_uid for i, r in zip(items, results) if r.outcome.delivered and i.info.digest]
        if not uids:
            return results
        known = self.journal.known_instances(dest.name, uids)
        return [self._check_uid(dest, item, result, known) for item, result in zip(items, results)]

    def _check_uid(self, dest: Destination, item: Item, result: InstanceResult,
                   known: dict[str, KnownInstance]) -> InstanceResult:
        """A confirmation (stored or duplicate) of a UID that this PACS confirmed before for other content is a
        UID conflict: a PACS such as Orthanc answers success and keeps the first version silently."""
        if not result.outcome.delivered or not item.info.digest:
            return result
        uid = item.info.sop_instance_uid
        earlier = known.get(uid)
        if earlier is None or earlier.digest == item.info.digest:
            known[uid] = KnownInstance(item.info.digest, str(item.path), time.time())
            return result
        earlier_file = _shown(item.spool, earlier.path)
        answer = "stored" if result.outcome is Outcome.DELIVERED else "duplicate"
        http = f"HTTP {result.http_status}" if result.http_status is not None else "C-STORE"
        with item.lock:
            item.conflicts[dest.name] = {
                "earlier_file": earlier_file, "earlier_delivered": iso_time(earlier.time),
                "pacs_answer": {"http_status": result.http_status, "answer": answer, "reason": result.reason},
                "note": "the PACS may have kept the earlier version: what it holds under this UID may not be this file"}
        return InstanceResult(uid, Outcome.UID_CONFLICT, result.http_status, result.reason_code,
                              f"the PACS answered {http}, {answer} ({result.reason}), but it confirmed this "
                              f"SOPInstanceUID before for other content: {earlier_file}, delivered "
                              f"{iso_time(earlier.time)}; the PACS may have kept that earlier version")

    def _drop_changed(self, item: Item, result: Changed) -> None:
        """Take a file that changed or vanished since its validation out of every queue and the journal, and
        hand it back (on_changed): validated again as a new version, or forgotten."""
        with item.lock:
            if item.done:  # settled everywhere meanwhile: its move decides
                return
            item.done = True
        for dest in self.destinations.values():
            with dest.cond:
                dest.waiting.pop(item, None)
                try:
                    dest.ready.remove(item)
                except ValueError:
                    pass
        # Rows of PACS that confirmed the old version go too: what sits in sending/ now is another file, which
        # no PACS has confirmed; marking it delivered would move an unsent file to sent/.
        with self._recording, self._items_lock:
            self.journal.forget(str(item.path))
            if self._items.get(item.path) is item:
                del self._items[item.path]
        what = "was removed" if result.gone else "changed"
        then = "forgotten" if result.gone else "it is validated again"
        logger.warning("{} {} in sending/ after validation ({}): not sent; {}", item.spool.relative(item.path),
                       what, result.reason, then)
        if self.on_changed:
            self.on_changed(item, result.gone)

    def _hand_over(self, items: list[Item]) -> None:
        """Give settled items to the finishing thread; finish them here when it does not run."""
        if not items:
            return
        if self._finisher is not None and self._finisher.is_alive():
            self._finishing.put(items)
        else:  # not started (one-off use), or already stopped
            self._finish(items)

    def _finish_loop(self) -> None:
        while True:
            group = self._finishing.get()
            last = group is None
            group = group or []
            while not last:  # what queued up meanwhile shares this fsync
                try:
                    more = self._finishing.get_nowait()
                except queue.Empty:
                    break
                last = more is None
                group.extend(more or [])
            if group:
                try:
                    self._finish(group)
                except Exception:  # e.g. the journal failed: untracked, the sweep takes them up again
                    logger.exception("finishing {} settled file(s) failed; the next retry sweep takes them up",
                                     len(group))
                    with self._items_lock:
                        for item in group:
                            self._items.pop(item.path, None)
            if last:
                return

    def _finish(self, items: list[Item]) -> None:
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
        with self._items_lock:
            for item in items:
                self._items.pop(item.path, None)
        for item in gone:
            logger.warning("PACS forward: {} was removed from sending/ by someone else before it could be moved "
                           "(every PACS had settled it)", item.spool.relative(item.path))
        for item, exc in stuck:
            logger.error("PACS forward: {} is settled but could not be moved out of sending/: {}; it stays "
                         "there and the next retry sweep moves it (check the spool's permissions and free "
                         "space)", item.spool.relative(item.path), exc)
        if self.on_finished:
            for item, folder in finished:
                self.on_finished(item, folder)

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
        folder = file_fate(states, self.destinations)
        if missing:
            logger.warning("PACS forward: the journal rows of {} for {} went missing after the PACS answered "
                           "(removed by a `relaypacsd retry` racing a claim of this name?); deciding from the "
                           "daemon's memory: {}", item.spool.relative(item.path), ", ".join(u.dest for u in missing),
                           "failed" if folder == "failed" else "delivered")
            if folder != "sent":  # staying in sending/ too: a PACS that confirmed it must not get it again
                self.journal.restore(key, item.info.sop_instance_uid, item.first_seen, missing)
                rows[key] = self.journal.rows(key)
        if folder is None:
            lost = sorted(d for d in self.destinations if d not in states)
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
            "pacs": {d: {"state": r.state, "attempts": r.attempts, "reason_code": _hex(r.last_code),
                         "error": r.last_error} for d, r in rows.items()},
            "history": self.journal.history(key),
            "next_step": "fix the cause, then `relaypacsd retry FILE` sends it again to the PACS that still need it",
        }
        if conflicted:
            # Memory of this run when it has it; after a restart, the journal's words.
            sidecar["uid_conflict"] = {d: item.conflicts.get(d) or {"detail": failed[d].last_error} for d in conflicted}
            sidecar["next_step"] = CONFLICT_NEXT_STEP
        new = item.spool.finish(item.path, "failed", sidecar, sync=False)
        self.journal.rename(key, str(new))
        return new

    # -- sweep and health --------------------------------------------------------------------------

    def sweep(self) -> int:
        """Release every waiting item whose next try has come, at healthy destinations; fail what is too old."""
        released = 0
        max_age, now = self.config.delivery.max_age_hours * 3600, time.monotonic()
        for dest in self.destinations.values():
            # A PACS that stays down gets no delivery attempt, so age is checked here too: for files parked
            # after a failure and for files that arrived while it was down (never taken from `ready`).
            # _record_many then fails them as too old (instance_fate).
            with dest.cond:
                expired = [item for item in dest.waiting if too_old(now - item.born, max_age)]
                for item in expired:
                    del dest.waiting[item]
                if not dest.healthy:
                    old_ready = [item for item in dest.ready if too_old(now - item.born, max_age)]
                    for item in old_ready:
                        dest.ready.remove(item)
                    expired += old_ready
            if expired:
                why = f"PACS down: {dest.down_reason}" if not dest.healthy else "not delivered in time"
                self._record_many(dest, [(item, InstanceResult(item.info.sop_instance_uid, Outcome.TRANSIENT,
                                                               None, None, why)) for item in expired])
            if dest.healthy:
                released += dest.release_due()
        return released

    def probe(self) -> None:
        """Probe every destination once and update its health (not once stopping: the journal may be closed)."""
        for dest in self.destinations.values():
            try:
                dest.sender.probe()
            except PacsError as exc:
                healthy, reason = False, str(exc)
            except Exception as exc:  # a probe must never kill the scheduler job
                healthy, reason = False, f"{type(exc).__name__}: {exc}"
            else:
                healthy, reason = True, ""
            if self.stop_event.is_set():
                return
            dest.set_health(healthy, reason)

    def on_destination_back(self, dest: Destination) -> None:
        """A destination came back: everything waiting for it goes now, not at its next sweep."""
        dest.release_due(everything=True)


class _UidChecked:
    """A destination's sender whose answers are checked for UID conflicts before anything logs or records them:
    a PACS's "stored" for other content under a known UID is never reported as delivered."""

    def __init__(self, engine: Engine, dest: Destination, by_part: dict[Part, Item]):
        self.engine, self.dest, self.by_part = engine, dest, by_part
        self.name, self.target = dest.sender.name, dest.sender.target

    def send(self, parts: list[Part]) -> tuple[list[InstanceResult], int | None]:
        results, status = self.dest.sender.send(parts)
        return self.engine.check_uids(self.dest, [self.by_part[p] for p in parts], results), status

    def probe(self) -> None:
        self.dest.sender.probe()


def backoff(base: float, attempts: int, cap: float) -> float:
    """Delay before the next delivery: base doubled per attempt, capped, with +-20 % jitter."""
    delay = min(cap, base * (2 ** max(0, attempts)))
    return delay * random.uniform(0.8, 1.2)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


CONFLICT_NEXT_STEP = (
    "another file with this SOPInstanceUID but other content reached that PACS first (see uid_conflict): if this "
    "file is a corrected version, give it a new SOPInstanceUID (and MediaStorageSOPInstanceUID) with a DICOM editor "
    "and drop it into inbox/; or delete the earlier instance at the PACS, then `relaypacsd retry FILE`: a retry "
    "forgets the earlier version at the PACS it resets, so this file then counts as delivered when the PACS "
    "confirms it (if the earlier instance is still there, the PACS may keep it instead)")


def _shown(spool: Spool, path: str) -> str:
    """A file's path as a technician finds it: below its spool folder when it is in this watch root."""
    try:
        return str(spool.relative(Path(path)))
    except ValueError:
        return path


def _hex(code: int | None) -> str | None:
    return None if code is None else f"0x{code:04X}"


def _detail(result: InstanceResult) -> str:
    code = f" [{_hex(result.reason_code)}]" if result.reason_code is not None else ""
    http = f" (HTTP {result.http_status})" if result.http_status is not None else ""
    return f"{result.outcome.value}{code}{http}: {result.reason}"


# -- one-shot delivery (relaypacsd send) ---------------------------------------------------------------


def send_safely(sender: Sender, parts: list[Part]) -> tuple[list[InstanceResult], int | None, str | None]:
    """One request: results per part, HTTP status, and the reason the destination is down (or None)."""
    uids = [p.sop_uid for p in parts]
    try:
        results, status = sender.send(parts)
    except DestinationProblem as exc:
        return results_for_error(uids, Outcome.DESTINATION, str(exc), exc.status), exc.status, str(exc)
    except PacsUnreachable as exc:
        return results_for_error(uids, Outcome.TRANSIENT, str(exc)), None, str(exc)
    except PacsError as exc:
        outcome = Outcome.TRANSIENT if exc.transient else Outcome.PERMANENT
        return results_for_error(uids, outcome, str(exc), exc.status), exc.status, None
    except (OSError, RelayPacsError) as exc:  # the file vanished, changed or became unreadable under us
        return _file_trouble(parts, exc), None, None
    problem = next((r for r in results if r.outcome is Outcome.DESTINATION), None)
    return results, status, (problem.reason if problem else None)


def _file_trouble(parts: list[Part], exc: Exception) -> list[InstanceResult]:
    """A file of the request could not be read: those changed or gone since validation are Changed (one stat
    each, only on this error path); the others were not sent and wait as transient."""
    out: list[InstanceResult | None] = []
    for part in parts:
        try:
            size: int | None = os.stat(part.path).st_size
        except FileNotFoundError:
            size = None
        except OSError:
            size = part.size  # unreadable, not changed: waiting may help (permissions fixed)
        if size is None:
            out.append(Changed(part.sop_uid, Outcome.TRANSIENT, None, None, "file gone", gone=True))
        elif size != part.size:
            out.append(Changed(part.sop_uid, Outcome.TRANSIENT, None, None,
                               f"size changed from {part.size} to {size} bytes"))
        else:
            out.append(None)
    changed = [p.path.name for p, r in zip(parts, out) if r is not None]
    why = (f"not sent: {', '.join(changed)} in the same request changed since validation; sent again without it"
           if changed else f"cannot read file: {exc}")
    return [r or InstanceResult(p.sop_uid, Outcome.TRANSIENT, None, None, why) for p, r in zip(parts, out)]


AttemptHook = Callable[[list[Part], list[InstanceResult], "int | None", float, int, "str | None"], None]


def deliver_parts(sender: Sender, parts: list[Part], attempts: int, delay: float,
                  sleep: Callable[[float], object] = time.sleep,
                  on_results: Callable[[list[Part], list[InstanceResult]], None] | None = None,
                  *, on_attempt: AttemptHook | None = None, may_retry: Callable[[], bool] = lambda: True,
                  ) -> dict[Part, InstanceResult]:
    """Deliver one batch: quick retries for transient/limited outcomes (delay doubling), whole-batch failures
    split in halves down to one file; a destination problem stops the retries. The daemon and `send` share it.

    `sleep` returning True means "stop now": what still waits is settled as transient. `on_attempt` sees every
    request (parts, results, HTTP status, ms, attempt, down-reason); `on_results` every settled group.
    """
    final: dict[Part, InstanceResult] = {}
    todo, attempt = list(parts), 0
    while todo:
        attempt += 1
        started = time.monotonic()
        results, status, down = send_safely(sender, todo)
        if on_attempt:
            on_attempt(todo, results, status, _ms(started), attempt, down)
        retry: list[Part] = []
        split: list[Part] = []
        settled: list[tuple[Part, InstanceResult]] = []
        go_on = may_retry()  # stopping, or the PACS is down: no further request for this batch
        for part, result in zip(todo, results):
            if result.outcome is Outcome.SPLIT and go_on:
                split.append(part)
            elif result.outcome is Outcome.SPLIT:
                settled.append((part, InstanceResult(part.sop_uid, Outcome.TRANSIENT, result.http_status,
                                                     result.reason_code, f"{result.reason} (not split now: "
                                                     "stopping, or the PACS is down)")))
            elif (result.outcome in (Outcome.TRANSIENT, Outcome.LIMITED) and attempt < attempts and down is None
                  and go_on and not isinstance(result, Changed)):
                retry.append(part)
            else:
                settled.append((part, result))
        if retry and sleep(delay * (2 ** (attempt - 1))):
            # stopping: what would have been retried waits for the next start
            settled += [(p, InstanceResult(p.sop_uid, Outcome.TRANSIENT, None, None, "daemon stopping")) for p in retry]
            retry = []
        final.update(settled)
        if on_results and settled:
            on_results([p for p, _ in settled], [r for _, r in settled])
        if split:
            # Blame no single file for a whole-batch failure: resend in halves down to one file.
            half = max(1, len(split) // 2)
            for chunk in (split[:half], split[half:]):
                if chunk:
                    final.update(deliver_parts(sender, chunk, attempts, delay, sleep, on_results,
                                               on_attempt=on_attempt, may_retry=may_retry))
        todo = retry
    return final
