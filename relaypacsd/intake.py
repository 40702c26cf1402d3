"""The intake: files waiting for validation, each queued once, and the validator threads that take them."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable

from loguru import logger

from relaypacsd.errors import JournalError
from relaypacsd.spool import Spool

VALIDATORS = 2  # validation threads per generation
LIMIT = 1000  # files queued or being validated before a scanner waits: a huge inbox or sending/ is taken in
# as fast as validation goes, not listed into memory first
VALIDATOR = "validate-"  # thread name prefix: a reload waits for these (an unpack) the longest


class Intake:
    """One generation's validation queue (huey's BaseProcess shape: loop / shutdown; `run` repeats loop)."""

    def __init__(self, validate: Callable[[Spool, Path], None], validators: int = VALIDATORS, limit: int = LIMIT):
        self.queue: "queue.Queue[tuple[Spool, Path] | None]" = queue.Queue()  # None: a validator's stop
        self.validators = validators
        self._validate = validate
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
        """Validate the next queued file (blocks until there is one); False at a validator's stop."""
        job = self.queue.get()  # blocks: shutdown() queues a None per validator
        if job is None:
            return False
        spool, path = job
        try:
            self._validate(spool, path)
        except JournalError as exc:
            if self.on_journal_error is None:
                logger.exception("validation of {} failed unexpectedly; it stays in sending/ for the next sweep", path)
            else:
                self.on_journal_error(exc)  # it stays in sending/, this node's: the sweep takes it up again
        except Exception:
            logger.exception("validation of {} failed unexpectedly; it stays in sending/ for the next sweep", path)
        finally:
            with self._lock:
                self._paths.discard(path)
                self._room.notify()
        return True

    def shutdown(self) -> None:
        """Wake every validator blocked on the queue: one stop each."""
        for _ in range(self.validators):
            self.queue.put(None)
