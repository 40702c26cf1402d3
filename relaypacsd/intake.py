"""The intake: files waiting for validation, each queued once, and the validator threads that take them."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

from loguru import logger

from relaypacsd.errors import JournalError
from relaypacsd.spool import Spool

VALIDATORS = 2  # validation threads per generation
LIMIT = 1000  # files queued or being validated before a scanner waits: a huge inbox or sending/ is taken in
# as fast as validation goes, not listed into memory first
GROUP = 32  # files a validator takes at once when that many wait: their journal rows are one commit
VALIDATOR = "validate-"  # thread name prefix: a reload waits for these (an unpack) the longest


T = TypeVar("T")  # what validation found valid of one file (validation.Valid)


class Intake(Generic[T]):
    """One generation's validation queue (huey's BaseProcess shape: loop / shutdown; `run` repeats loop)."""

    def __init__(self, validate: Callable[[Spool, Path], T | None], validators: int = VALIDATORS, limit: int = LIMIT,
                 submit: Callable[[list[T]], None] | None = None, group: int = GROUP):
        self.queue: "queue.Queue[tuple[Spool, Path] | None]" = queue.Queue()  # None: a validator's stop
        self.validators = validators
        self._validate = validate  # one file: what to submit of it, or None (refused, held already, ...)
        self._submit = submit  # what the validation of a group found valid, at once (one journal commit)
        self.group = group
        self._paths: set[Path] = set()  # queued or being validated: not queued again
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self.limit = limit
        self.on_journal_error: Callable[[JournalError], None] | None = None  # the journal away: said once elsewhere

    def put(self, spool: Spool, path: Path, stop: threading.Event | None = None) -> None:
        """Queue `path` for validation unless it is queued or being validated already. With `stop` (a scanner's),
        first wait while `limit` files are queued, until there is room or `stop` is set. Validators queue
        without waiting (a zip's members): they are the ones who make room."""
        with self._lock:
            while stop is not None and len(self._paths) >= self.limit and not stop.is_set() and path not in self._paths:
                self._room.wait(0.5)
            if path in self._paths:
                return
            self._paths.add(path)
        self.queue.put((spool, path))

    def pending_paths(self) -> set[Path]:
        """The files queued or being validated now (a copy)."""
        with self._lock:
            return set(self._paths)

    def run(self, stop: threading.Event) -> None:
        """A validator thread: validate queued files until `stop` (this generation's) or a stop in the queue."""
        while not stop.is_set() and self.loop():
            pass

    def loop(self) -> bool:
        """Validate the next queued files (blocks until there is one), up to `group` of those already waiting,
        and submit the valid ones together; False at a validator's stop."""
        job = self.queue.get()  # blocks: shutdown() queues a None per validator
        if job is None:
            return False
        jobs, stopping = [job], False
        while len(jobs) < self.group:  # only what waits already: the first file is never held back
            try:
                more = self.queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                stopping = True  # this validator's stop: after the files it took
                break
            jobs.append(more)
        valid: list[T] = []
        first = True  # the first valid file goes alone, at once: a burst's first file never waits for the rest
        try:
            for spool, path in jobs:
                found = self._guarded(path, lambda: self._validate(spool, path))
                if found is not None and first:
                    self._submit_group([found], path)
                    first = False
                elif found is not None:
                    valid.append(found)
            self._submit_group(valid, f"{len(valid)} files")
        finally:
            with self._lock:
                for _, path in jobs:
                    self._paths.discard(path)
                self._room.notify(len(jobs))
        return not stopping

    def _submit_group(self, valid: list[T], what: object) -> None:
        if valid and self._submit is not None:
            submit = self._submit
            self._guarded(what, lambda: submit(valid))

    def _guarded(self, what: object, step: Callable[[], T | None]) -> T | None:
        """Run one step of validation; an error leaves its files in sending/ for the next sweep."""
        try:
            return step()
        except JournalError as exc:
            if self.on_journal_error is None:
                logger.exception("validation of {} failed unexpectedly; it stays in sending/ for the next sweep", what)
            else:
                self.on_journal_error(exc)  # it stays in sending/, this node's: the sweep takes it up again
        except Exception:
            logger.exception("validation of {} failed unexpectedly; it stays in sending/ for the next sweep", what)
        return None

    def shutdown(self) -> None:
        """Wake every validator blocked on the queue: one stop each."""
        for _ in range(self.validators):
            self.queue.put(None)
