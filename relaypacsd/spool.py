"""The folder state machine of one watch root: inbox/ -> sending/ -> sent/ | failed/, by atomic renames."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from relaypacsd.errors import AlreadyFinished, SpoolError
from relaypacsd.names import NAME_MAX, fit_name, valid_path
from relaypacsd.renames import free_folders, fsync_dir, move_to_free_name, rename_noreplace, same_file
from relaypacsd.sidecars import SIDECAR_SUFFIX, sidecar_path, write_sidecar

FOLDERS = ("inbox", "sending", "sent", "failed")


@dataclass(frozen=True)
class Spool:
    """One watch root and its four folders, all on one filesystem so every move is one rename."""

    root: Path

    # Cached: these are read several times per file, and each `root / name` built a new Path.
    @functools.cached_property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @functools.cached_property
    def sending(self) -> Path:
        return self.root / "sending"

    @functools.cached_property
    def sent(self) -> Path:
        return self.root / "sent"

    @functools.cached_property
    def failed(self) -> Path:
        return self.root / "failed"

    @functools.cached_property
    def inbox_text(self) -> str:
        """inbox/'s path as text, for comparisons that run per file."""
        return os.fspath(self.inbox)

    @functools.cached_property
    def sending_text(self) -> str:
        """sending/'s path as text, for comparisons that run per file."""
        return os.fspath(self.sending)

    @functools.cached_property
    def _prefixes(self) -> tuple[tuple[str, int], ...]:
        """(folder path + separator, its length) of the four folders."""
        return tuple((text, len(text)) for text in (os.path.join(self.root, name) + os.sep for name in FOLDERS))

    def prepare(self) -> None:
        """Create the four folders and refuse a layout that would need copies instead of renames."""
        try:
            for name in FOLDERS:
                (self.root / name).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"watch root {self.root}: cannot create {name}/ ({exc.strerror}): "
                             "create it and give the service user write access") from None
        devices = {name: os.stat(self.root / name).st_dev for name in FOLDERS}
        if len(set(devices.values())) != 1:
            raise SpoolError(f"watch root {self.root}: inbox/, sending/, sent/ and failed/ are on different "
                             f"filesystems ({devices}): put all four on one filesystem (one volume in Docker) so "
                             "every move is an atomic rename")
        for name in FOLDERS:
            if not os.access(self.root / name, os.W_OK | os.X_OK):
                raise SpoolError(f"watch root {self.root}: {name}/ is not writable by this user: "
                                 "chown it to the service user or fix its mode")

    def relative(self, path: Path) -> Path:
        """The path of a spooled file below its folder (inbox/a/b.dcm -> a/b.dcm)."""
        return Path(self.relative_text(path))

    def relative_text(self, path: str | os.PathLike[str]) -> str:
        """`relative` as text, for records and log lines: building the Path cost more than finding it."""
        # String prefixes, not Path.relative_to: this runs several times per file, and relative_to
        # raised and caught a ValueError for every folder that did not match. The paths come from Paths,
        # so the text is already in the form Path would give it.
        text = os.fspath(path)
        for prefix, n in self._prefixes:
            if text.startswith(prefix):
                return text[n:] or "."
            if text == prefix[:-1]:
                return "."
        raise ValueError(f"{path} is not inside watch root {self.root}")

    def claim(self, path: Path, *, sync: bool = True) -> Path | None:
        """Move a complete file from inbox/ to sending/; None if someone else took it first, AlreadyFinished
        (the name gone) if it was a second name of a file in sent/ or failed/.

        sync=False leaves the directory fsync to the caller, who batches it (`sync_dirs`)."""
        moved = self._move(path, self.sending / valid_path(self.relative(path)), missing_ok=True, sync=sync)
        # One lstat a file: a claim by the link fallback stopped between its link and its unlink (a node paused
        # on a share) left its inbox/ name beside a file another node then sent; claimed again, it went twice.
        if moved is not None and os.lstat(moved).st_nlink > 1 and self._finished_twin(moved) is not None:
            os.unlink(moved)
            raise AlreadyFinished(f"{self.relative_text(moved)} in inbox/ was a second name of a file already in sent/ "
                                  "or failed/ (a move between folders stopped halfway, on a share without renameat2): "
                                  "that name went, nothing is sent")
        return moved

    def _finished_twin(self, path: Path) -> Path | None:
        """The name in sent/ or failed/ that `path`, in sending/, is a second name of (one inode), if any."""
        relative = self.relative_text(path)
        for twin in (self.sent / relative, self.failed / relative):
            if same_file(path, twin):
                return twin
        return None

    def finish(self, path: Path, folder: str, error: dict[str, Any] | None = None, *, sync: bool = True) -> Path:
        """Move a file from sending/ to sent/ or failed/; a failed file gets its sidecar first."""
        if folder not in ("sent", "failed"):
            raise ValueError(folder)
        dest = (self.sent if folder == "sent" else self.failed) / self.relative_text(path)
        if folder == "failed" and len(os.fsencode(dest.name)) + len(SIDECAR_SUFFIX) > NAME_MAX:
            dest = dest.with_name(fit_name(dest.stem, dest.suffix))  # else its sidecar's name is too long
        # The sidecar goes first: a file that reaches failed/ always has its reason beside it.
        before = (lambda d: write_sidecar(d, error or {"reason": "unknown"})) if folder == "failed" else None
        moved = self._move(path, dest, missing_ok=False, before=before, sync=sync)
        assert moved is not None
        return moved

    def move_to(self, src: Path, dest: Path) -> None:
        """Rename `src` to exactly `dest` (FileExistsError when taken), creating its folder; durable."""
        try:
            rename_noreplace(src, dest)
        except FileNotFoundError:
            if not os.path.lexists(src):
                raise
            dest.parent.mkdir(parents=True, exist_ok=True)
            rename_noreplace(src, dest)
        fsync_dir(dest.parent)

    def make_valid(self, path: Path) -> Path | None:
        """Give a file in sending/ whose name is not valid UTF-8 (`valid_path`) a valid one; None if gone."""
        return self._move(path, self.sending / valid_path(self.relative(path)), missing_ok=True)

    def requeue(self, path: Path) -> Path:
        """Move a failed file back into sending/ (operator retry) and drop its sidecar."""
        sidecar = sidecar_path(path)
        moved = self._move(path, self.sending / self.relative(path), missing_ok=False)
        assert moved is not None
        try:
            sidecar.unlink()
        except FileNotFoundError:
            pass
        return moved

    def clean_after_crash(self, quiet_for: float = 0.0) -> list[Path]:
        """Remove what a crash can leave behind in failed/: half-written sidecar temp files, and sidecars
        whose file never arrived (the sidecar goes first; the file is still in sending/ and is retried).
        With several gateways on the spool, one younger than `quiet_for` s may be another node's move, under way."""
        removed = []
        limit = time.time() - quiet_for
        for dirpath, _dirnames, filenames in os.walk(self.failed):
            for name in filenames:
                path = Path(dirpath) / name
                stale_temp = name.startswith(".relaypacs-") and name.endswith(".tmp")
                orphan = name.endswith(SIDECAR_SUFFIX) and not path.with_name(name[:-len(SIDECAR_SUFFIX)]).exists()
                if (stale_temp or orphan) and quiet_for and _mtime(path) > limit:
                    continue
                if stale_temp or orphan:
                    try:
                        path.unlink()
                        removed.append(path)
                    except FileNotFoundError:
                        pass
        return removed

    def finish_interrupted_moves(self) -> list[Path]:
        """At start-up: a move by the link fallback (`renames._link_noreplace`) killed between its link and its
        unlink left one file under two names. inbox/ and sending/: its inbox/ name goes, or it is sent twice;
        sending/ and sent/ or failed/ (a finishing move): its sending/ name goes, or it is sent again."""
        removed = []
        for path in self.walk("sending"):  # a million files waiting: never a list of them
            try:
                if os.lstat(path).st_nlink == 1:
                    continue
                finished = self._finished_twin(path)
                twin = self.inbox / self.relative(path) if finished is None else path
                if finished is not None or same_file(path, twin):
                    os.unlink(twin)
                    removed.append(twin)
            except OSError:  # gone meanwhile, or a folder we may not write: the claim sorts it out later
                continue
        return removed

    def files(self, folder: str) -> Iterator[Path]:
        """Regular files below a folder (recursively), sidecars and temp files excluded."""
        base = self.root / folder
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(SIDECAR_SUFFIX) or name.startswith(".relaypacs-"):
                    continue
                yield Path(dirpath) / name

    def walk(self, folder: str) -> Iterator[Path]:
        """The files of `files()`, in directory order: one entry at a time, so a flat folder of a million files
        costs no list of their names (files() sorts each folder's names, and os.walk lists them first)."""
        folders = [str(self.root / folder)]
        while folders:
            try:
                with os.scandir(folders.pop()) as entries:
                    for entry in entries:
                        try:
                            is_dir = entry.is_dir()
                        except OSError:
                            continue
                        if is_dir:
                            if not entry.is_symlink():  # as os.walk: a link to a folder is not followed
                                folders.append(entry.path)
                        elif not entry.name.endswith(SIDECAR_SUFFIX) and not entry.name.startswith(".relaypacs-"):
                            yield Path(entry.path)
            except OSError:
                continue

    def stats(self) -> tuple[dict[str, int], float | None]:
        """Files per folder, and the age in seconds of the oldest file waiting (inbox/ or sending/), counted
        from its arrival in its folder (see `age_seconds`)."""
        counts: dict[str, int] = {}
        oldest: float | None = None
        now = time.time()
        for folder in FOLDERS:
            counts[folder] = 0
            for path in self.walk(folder):
                counts[folder] += 1
                if folder in ("inbox", "sending"):
                    age = age_seconds(path, now)
                    if age is not None:
                        oldest = age if oldest is None else max(oldest, age)
        return counts, oldest

    def _move(self, src: Path, dest: Path, *, missing_ok: bool,
              before: Callable[[Path], object] | None = None, sync: bool = True) -> Path | None:
        """Rename within this spool to `dest` or a free name near it (renames.move_to_free_name)."""
        return move_to_free_name(src, dest, self.relative, missing_ok=missing_ok, before=before, sync=sync)

    def _free_folders(self, dest: Path) -> Path:
        """`dest` with folders that a file holds the name of renamed to free names (renames.free_folders)."""
        return free_folders(dest, self.relative)

    def prune(self, folder: Path, min_age: float) -> int:
        """Remove `folder` and its parents, up to (never) the spool folder, while they are empty and have not
        changed for `min_age` seconds (a writer that just made one is about to put its file there).
        Returns how many went."""
        removed = 0
        limit = time.time() - min_age
        try:
            mtime = os.lstat(folder).st_mtime
            while self.relative(folder) != Path(".") and mtime <= limit:  # never one of the four folders
                # The parent's mtime before our rmdir changes it: was it quiet, apart from us?
                mtime = os.lstat(folder.parent).st_mtime
                os.rmdir(folder)  # refuses a folder that is not empty: nothing to check first
                removed += 1
                folder = folder.parent
        except (OSError, ValueError):  # not empty, gone, or not in this spool
            pass
        return removed

    def empty_folders(self, folder: str) -> list[Path]:
        """Every empty folder below one of the four folders (at start-up: those earlier runs left), deepest first."""
        # scandir, one entry at a time: os.walk would list each folder's files, a million in a flat sending/.
        top = str(self.root / folder)
        folders, empty = [top], []
        while folders:
            current = folders.pop()
            found = False
            try:
                with os.scandir(current) as entries:
                    for entry in entries:
                        found = True
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(entry.path)
            except OSError:
                continue
            if not found and current != top:
                empty.append(Path(current))
        return sorted(empty, key=lambda p: len(p.parts), reverse=True)


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def age_seconds(path: Path, now: float | None = None) -> float | None:
    """Seconds since the file arrived in its folder (None if it is gone), whatever mtime it carries.

    `cp -p` and `rsync -a` keep the original mtime, so a file copied in today may say "30 days old". On
    Linux a rename sets the inode's ctime (ext4, xfs, btrfs, tmpfs: checked on ext4 and tmpfs), and so do
    writing and utime(), so ctime is when the file was moved or written into its folder. max() with the
    mtime keeps a filesystem that leaves ctime alone at the old behaviour."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return max(0.0, (time.time() if now is None else now) - max(st.st_mtime, st.st_ctime))


