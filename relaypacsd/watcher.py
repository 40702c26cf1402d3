"""Turn file events and periodic scans of the inboxes into "this file is complete and may be claimed"."""

from __future__ import annotations

import fnmatch
import functools
import os
import queue
import re
import stat
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileModifiedEvent,
                             FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver
from watchdog.observers.inotify_c import InotifyConstants, Mask
from watchdog.observers.polling import PollingObserver

from relaypacsd.config import WatchConfig
from relaypacsd.sidecars import SIDECAR_SUFFIX

# Names that modalities, copy tools and editors use while a file is still being written.
DEFAULT_IGNORE = (".*", "*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.filepart", "~*", "*~",
                  ".~lock*", "*.swp", "*" + SIDECAR_SUFFIX, "Thumbs.db", "desktop.ini")
# With native events, a file opened for writing and silent this long is taken anyway (lost close event).
WRITER_STALL = 60.0
# Filesystems where writes by other hosts raise no inotify event: poll them.
REMOTE_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse", "9p", "ceph", "glusterfs", "afs", "davfs",
             "vboxsf", "sshfs", "lustre", "gpfs", "beegfs", "ocfs2", "gfs2")
# The events _Handler uses. Without a filter, watchdog also asks inotify for opens, reads-closes and
# deletes and builds a Python event for each: a fifth of the daemon's CPU went there under load.
# Writes (IN_MODIFY, one per write() call) are kept although they cost the most: they are what tells a
# writer that pauses longer than the settle time from a finished file when the create came late.
# Files a rescan takes on as candidates at most: each is stat'ed at every tick until it settles, and a huge
# inbox (a million files copied in while the daemon was stopped) must neither be held in memory at once nor
# make every tick stat it all. Once claims have made room, the walk goes on (from the top: what was claimed is
# gone, what is a candidate already is passed over).
CANDIDATES = 10000
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent]


def _pattern(extra: tuple[str, ...]) -> re.Pattern[str]:
    """One regular expression for the default and `extra` patterns, lower-cased (shell-style, as fnmatch)."""
    return re.compile("|".join(fnmatch.translate(pat.lower()) for pat in DEFAULT_IGNORE + extra))


# One compiled expression per set of extra patterns (one per watch root): this runs per event and per rescanned
# name, and fnmatch over fifteen patterns was a tenth of the daemon's CPU per file.
_patterns = functools.lru_cache(maxsize=64)(_pattern)


def is_ignored(name: str, extra: tuple[str, ...] = ()) -> bool:
    """True for names that mean "not finished" or "not an image" (temp files, dotfiles, sidecars)."""
    # Case-blind: a Windows client on a share writes IMG.PART and X.TMP as readily as the lower-case forms.
    return _patterns(tuple(extra)).match(name.lower()) is not None


def filesystem_type(path: str | os.PathLike[str], mountinfo: str = "/proc/self/mountinfo") -> str:
    """The filesystem type of the mount holding `path`, from /proc/self/mountinfo ('' if unknown)."""
    target = os.path.realpath(path)
    best, best_type = "", ""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) < 5 or not right:
                    continue
                mount_point = parts[4].replace("\\040", " ")
                fstype = right.split()[0]
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fstype
    except OSError:
        return ""
    return best_type


def choose_observer(path: str | os.PathLike[str], mode: str) -> str:
    """'native' or 'polling' for a watch root: `auto` polls on network and FUSE filesystems."""
    if mode != "auto":
        return mode
    fstype = filesystem_type(path)
    base = fstype.split(".")[0]  # fuse.sshfs, fuse.bindfs ...
    return "polling" if base in REMOTE_FS else "native"


_Key = tuple[int, int, int]
_Event = tuple[str, str, "_Key | None"]


def _stat_key(path: str) -> _Key | None:
    """(size, mtime, inode) of a regular file; None for anything else (gone, symlink, device)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class _InboxEmitter(InotifyFullEmitter):
    """inotify without IN_MOVED_FROM: every rename into the inbox is reported at once as a move.

    watchdog holds each IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and every event behind
    it waits too. Each claim (inbox/ -> sending/) raises one, so the close events of the next files
    reached us up to half a second late. A move out of the inbox tells us nothing; a move in, paired or
    not, is a complete file (the full emitter reports it with an empty source).
    """

    def get_event_mask_from_filter(self) -> Mask:
        return Mask(super().get_event_mask_from_filter() & ~InotifyConstants.IN_MOVED_FROM)

    def queue_event(self, event: FileSystemEvent) -> None:
        # For a folder moved in, watchdog walks it and makes a synthetic created event per file, each queued,
        # dispatched and stat'ed. The folder's own moved event makes the scanner walk it (_Handler: "dir"),
        # which finds the same files, so those are dropped here. Events inotify reported (watches it adds,
        # files made before them) all pass.
        if event.is_synthetic and event.event_type == "created":
            return
        super().queue_event(event)


class _InboxObserver(InotifyObserver):
    """watchdog's inotify observer with the inbox emitter."""

    def __init__(self) -> None:
        super().__init__(generate_full_events=True)
        self._emitter_class = _InboxEmitter
        # Unpaired, a folder renamed inside the inbox makes watchdog register the folder's watch again,
        # with a RuntimeWarning a technician would read as a fault. The watch is right (a test follows
        # such a folder). Added again per observer: the filter list is process-wide and idempotent.
        warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning,
                                module="watchdog")


class _Handler(FileSystemEventHandler):
    """Runs on the observer's thread: only queues (path, kind, key), never blocks (watchdog #931).

    kind: "complete" (closed after writing, or renamed into place: key is the file's state at that
    moment, so a file reopened before the scanner looks waits again), "writing" (written to, or
    created empty: a writer holds it), "seen" (anything else; key is its state when seen, or None),
    "dir" (a folder appeared: walk it, a folder moved in brings files that raise no event of their own).
    """

    def __init__(self, events: "queue.SimpleQueue[_Event]", arrived: threading.Event | None = None,
                 idle: threading.Event | None = None):
        self.events = events
        self.arrived = arrived
        self.idle = idle  # set while the scanner sleeps until the next rescan: then any event wakes it

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if event.is_directory:
            if kind in ("created", "moved"):
                target = event.dest_path if kind == "moved" else event.src_path
                self.events.put((os.fsdecode(target), "dir", None))
                self._arrived()
            return
        if kind == "moved":
            path = os.fsdecode(event.dest_path)
            self.events.put((path, "complete", _stat_key(path)))
            self._arrived()
        elif kind == "closed":
            path = os.fsdecode(event.src_path)
            self.events.put((path, "complete", _stat_key(path)))
            self._arrived()
        elif kind == "modified":
            self.events.put((os.fsdecode(event.src_path), "writing", None))
            self._wake_idle()
        elif kind == "created":
            # A new file is empty when created. One that already has data is either a create we handle
            # late (its writes will say "writing") or watchdog's replay for a folder moved in or made
            # just before its watch (no writer may be left, and no close event may come): settle.
            path = os.fsdecode(event.src_path)
            key = _stat_key(path)
            if key is not None and key[0] == 0:
                self.events.put((path, "writing", None))
            else:
                self.events.put((path, "seen", key))  # its state now: the scanner need not stat it again
            self._wake_idle()

    def _arrived(self) -> None:
        if self.arrived is not None and not self.arrived.is_set():
            self.arrived.set()

    def _wake_idle(self) -> None:
        # Only an idle scanner: one with files settling already ticks, and a wake-up per write() would spin it.
        if self.idle is not None and self.idle.is_set():
            self._arrived()


@dataclass
class _Candidate:
    key: _Key
    since: float
    closed_key: _Key | None = None
    writing: bool = False  # native events only: opened for writing and not closed yet


@dataclass
class InboxWatcher:
    """Watches one inbox (native events or polling, plus rescans) and reports complete files."""

    inbox: Path
    config: WatchConfig
    arrived: threading.Event | None = None  # set when a file may have become complete: the scanner looks at once
    mode: str = field(init=False, default="")
    _events: "queue.SimpleQueue[_Event]" = field(init=False, default_factory=queue.SimpleQueue)
    _candidates: dict[str, _Candidate] = field(init=False, default_factory=dict)
    _observer: BaseObserver | None = field(init=False, default=None)
    _next_rescan: float = field(init=False, default=0.0)
    _warned: set[str] = field(init=False, default_factory=set)
    _idle: threading.Event = field(init=False, default_factory=threading.Event)
    _next_due: float = field(init=False, default=float("inf"))  # native: the earliest settle time of a candidate
    _more: bool = field(init=False, default=False)  # the last walk stopped at CANDIDATES: files are left unseen
    _prefix: str = field(init=False, default="")  # the inbox's path and a separator: names below it are relative

    def __post_init__(self) -> None:
        self._prefix = os.path.join(self.inbox, "")

    def start(self) -> None:
        """Start the observer; fall back to polling when inotify limits are exhausted."""
        self.mode = choose_observer(self.inbox, self.config.observer)
        try:
            self._observer = self._start_observer(self.mode)
        except OSError as exc:
            if self.mode != "native":
                raise
            logger.warning("watch {}: native events unavailable ({}); polling every {} s instead. Raise "
                           "fs.inotify.max_user_watches / max_user_instances to use inotify",
                           self.inbox, exc, self.config.poll_interval)
            self.mode = "polling"
            self._observer = self._start_observer("polling")
        logger.info("watch {}: {} observer (filesystem {}), settle {} s, rescan every {} s", self.inbox, self.mode,
                    filesystem_type(self.inbox) or "?", self.config.settle_seconds, self.config.rescan_interval)
        self._next_rescan = 0.0  # the first tick scans: files that arrived while we were stopped

    def _start_observer(self, mode: str) -> BaseObserver:
        observer = PollingObserver(timeout=self.config.poll_interval) if mode == "polling" else _InboxObserver()
        observer.daemon = True
        observer.schedule(_Handler(self._events, self.arrived, self._idle), str(self.inbox), recursive=True,
                          event_filter=EVENTS)
        observer.start()
        return observer

    def stop(self) -> None:
        """Stop the observer thread and wait for it."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def alive(self) -> bool:
        """True while the observer thread runs."""
        return self._observer is not None and self._observer.is_alive()

    def tick(self, now: float | None = None) -> list[Path]:
        """Drain events, rescan when due, and return the files that are complete now."""
        now = time.monotonic() if now is None else now
        self._idle.clear()  # looking now: events need not wake us until idle_wait says so again
        while True:
            try:
                path, kind, key = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "dir":
                self._rescan(now, Path(path))
            else:
                self._note(path, kind, key, now)
        if now >= self._next_rescan:
            self._rescan(now)
            self._next_rescan = now + self.config.rescan_interval
        elif self._more and len(self._candidates) < CANDIDATES // 2:
            self._rescan(now)  # the rest of a huge inbox, now that claims have made room
        ready: list[Path] = []
        native = self.mode == "native"
        next_due = float("inf")
        for path, cand in list(self._candidates.items()):
            # With inotify we know a writer still holds the file open: wait for its close, however long it
            # pauses, unless it stays silent for WRITER_STALL (a lost event must not block a file forever).
            settle = max(self.config.settle_seconds, WRITER_STALL) if cand.writing else self.config.settle_seconds
            if native and cand.closed_key is None and now - cand.since < settle:
                # It cannot be ready before its settle time, and a write raises an event that resets it: its
                # state is compared with the one it was seen with at that time (a lost event is caught then),
                # not stat'ed at every tick (a burst of 2,000 files took 11 stats each over a 2 s settle).
                # Polling sees writes only by the stat: it looks at every tick.
                if cand.since + settle < next_due:
                    next_due = cand.since + settle
                continue
            key = self._key(path)
            if key is None:
                del self._candidates[path]
                continue
            if key != cand.key:
                cand.key, cand.since = key, now
            else:
                # An empty file that was closed may be touched first and written later: let it settle.
                closed_done = cand.closed_key == key and key[0] > 0
                if closed_done or now - cand.since >= settle:
                    del self._candidates[path]
                    ready.append(Path(path))
                    continue
            next_due = min(next_due, cand.since + settle)
        self._next_due = next_due
        return ready

    def pending(self) -> int:
        """Files seen but not yet complete."""
        return len(self._candidates)

    def idle_wait(self, tick: float, now: float | None = None) -> float:
        """Seconds the scanner may wait for an event before its next tick: `tick` while files settle, else
        until the next rescan, and then any event (a new file's first write) wakes it, not only a complete one."""
        now = time.monotonic() if now is None else now
        self._idle.set()  # before the checks: an event queued after them finds it set and wakes the scanner
        if self._candidates or not self._events.empty():
            self._idle.clear()
            if self.mode == "native":
                # Nothing is ready before its settle time, and a write raises an event: look then, not at the
                # next tick after it (ticks drift by their own work: a 2,000-file burst was claimed 70 ms late).
                return min(tick, max(0.001, self._next_due - now))
            return tick
        return max(tick, self._next_rescan - now)

    def _note(self, path: str, kind: str, event_key: _Key | None, now: float, checked: bool = False) -> None:
        # Every component counts: a file in inbox/.staging/ is as unfinished as one named .x.dcm,
        # whether an event or a rescan reports it (`checked`: the rescan's walk looked at each already).
        if not checked and self._unfinished(path):
            return
        # The handler's stat at the event, where it made one: a second one here would tell nothing more (a
        # change since is caught by the stat at the settle time, which then waits a settle time again).
        key = event_key if event_key is not None else self._key(path)
        if key is None:
            self._candidates.pop(path, None)
            return
        cand = self._candidates.get(path)
        if cand is None:
            cand = self._candidates[path] = _Candidate(key=key, since=now)
        elif cand.key != key:
            cand.key, cand.since = key, now
        if kind == "complete" and event_key is not None:
            cand.closed_key = event_key
            cand.writing = False
        elif kind == "writing" and self.mode == "native":
            cand.writing = True
            cand.closed_key = None  # written again after a close (reopened to append): that close is void

    def _rescan(self, now: float, top: Path | None = None) -> None:
        """The source of truth: events are hints, a directory walk finds whatever they missed (up to CANDIDATES
        files taken on; the walk reads one entry at a time, so a flat folder of a million is never listed)."""
        self._more = False
        folders = [str(top or self.inbox)]
        if top is not None and top != self.inbox and self._unfinished(str(top)):
            return  # the walk looks at the names below `top`; the folders down to it are looked at here
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        try:
                            is_dir = entry.is_dir()
                        except OSError:
                            continue
                        if is_ignored(entry.name, self.config.ignore):
                            continue
                        if is_dir:
                            if not entry.is_symlink():  # as os.walk: a link to a folder is not followed
                                folders.append(entry.path)
                        elif entry.path not in self._candidates:
                            if len(self._candidates) >= CANDIDATES:
                                self._more = True
                                return
                            self._note(entry.path, "seen", None, now, checked=True)
            except OSError as exc:
                self._unreadable(exc)

    def _unfinished(self, path: str) -> bool:
        """True when a component of `path` below the inbox is an ignored name (a temp file, inbox/.staging/...)."""
        prefix = self._prefix
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, self.inbox)
        return any(is_ignored(part, self.config.ignore) for part in rel.split(os.sep))

    def _unreadable(self, exc: OSError) -> None:
        """A folder the walk cannot list: its files would wait unseen, so say so (once per folder)."""
        folder = exc.filename or str(self.inbox)
        if isinstance(exc, FileNotFoundError) and folder != str(self.inbox):
            return  # a folder gone since its event (made, then renamed at once): nothing waits in it
        if folder not in self._warned:
            self._warned.add(folder)
            logger.error("watch {}: cannot list {} ({}): files in it are not forwarded; give the service user "
                         "read and write access to it", self.inbox, folder, exc.strerror or exc)

    def _key(self, path: str) -> _Key | None:
        key = _stat_key(path)
        if key is None and os.path.lexists(path) and path not in self._warned:
            self._warned.add(path)
            logger.warning("watch {}: ignoring {} (not a regular file: symlinks, devices and pipes are "
                           "never forwarded; copy the real file in)", self.inbox, path)
        return key
