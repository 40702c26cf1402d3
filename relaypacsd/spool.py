"""The folder state machine of one watch root: inbox/ -> sending/ -> sent/ | failed/, by atomic renames."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from relaypacsd.errors import SpoolError
from relaypacsd.timefmt import iso_time

FOLDERS = ("inbox", "sending", "sent", "failed")
SIDECAR_SUFFIX = ".error.json"
NAME_MAX = 255  # bytes of one name (Linux, most filesystems); names we make are cut to fit, sidecar suffix included

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):  # not glibc >= 2.28: fall back to check-then-rename
    _renameat2 = None
# Tests on a fake filesystem (pyfakefs) turn this off: ctypes calls would reach the real disk.
USE_RENAMEAT2 = _renameat2 is not None


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable: fsync the directory itself."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on a directory; the rename itself stands
        pass
    finally:
        os.close(fd)


_SIDECAR_MOVES = threading.Lock()  # serialises this process's moves that place a sidecar (see Spool._move)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename atomically, failing with FileExistsError instead of overwriting `dst`."""
    if USE_RENAMEAT2:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
        # this filesystem (NFS, older CIFS) cannot do it: fall through
    _link_noreplace(src, dst)


def _link_noreplace(src: Path, dst: Path) -> None:
    """Rename without overwriting where renameat2 cannot: link(2) refuses a taken name atomically, even on
    NFS; then the old name goes. Where hard links are refused too (some CIFS), check-then-rename."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        # NFS over UDP may retry a LINK that succeeded and report EEXIST: the same inode is ours.
        if not _same_file(src, dst):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EACCES):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst)) from None
        os.replace(src, dst)
        return
    try:
        os.unlink(src)
    except FileNotFoundError:  # a retried NFS UNLINK that had already succeeded
        pass
    except OSError:
        # link(2) needs no write access to src's folder, unlink(2) does: undo the link, or the file would
        # stand in two folders (sent from one, claimed again from the other, for ever).
        os.unlink(dst)
        raise


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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
        # String prefixes, not Path.relative_to: this runs several times per file, and relative_to
        # raised and caught a ValueError for every folder that did not match.
        text = os.fspath(path)
        for prefix, n in self._prefixes:
            if text.startswith(prefix):
                return Path(text[n:] or ".")
            if text == prefix[:-1]:
                return Path(".")
        raise ValueError(f"{path} is not inside watch root {self.root}")

    def claim(self, path: Path, *, sync: bool = True) -> Path | None:
        """Move a complete file from inbox/ to sending/; None if someone else took it first.

        sync=False leaves the directory fsync to the caller, who batches it (`sync_dirs`)."""
        return self._move(path, self.sending / valid_path(self.relative(path)), missing_ok=True, sync=sync)

    def finish(self, path: Path, folder: str, error: dict[str, Any] | None = None, *, sync: bool = True) -> Path:
        """Move a file from sending/ to sent/ or failed/; a failed file gets its sidecar first."""
        if folder not in ("sent", "failed"):
            raise ValueError(folder)
        dest = self.root / folder / self.relative(path)
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

    def finish_interrupted_claims(self) -> list[Path]:
        """At start-up: a claim by the link fallback (`_link_noreplace`) killed between its link and its unlink
        left one file under two names, inbox/ and sending/; its inbox/ name goes now, or it is sent twice."""
        removed = []
        for path in self.walk("sending"):  # a million files waiting: never a list of them
            twin = self.inbox / self.relative(path)
            try:
                if os.lstat(path).st_nlink > 1 and _same_file(path, twin):
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

    def _reserve(self, dest: Path) -> Path:
        """A free name near `dest`: a same-named file never overwrites another (a.dcm, a~1.dcm, ...)."""
        candidate, n = dest, 0
        while os.path.lexists(candidate) or os.path.lexists(sidecar_path(candidate)):
            n += 1
            candidate = clashed(dest, n)
        return candidate

    def _move(self, src: Path, dest: Path, *, missing_ok: bool,
              before: Callable[[Path], object] | None = None, sync: bool = True) -> Path | None:
        if before is None:
            return self._rename_to_free_name(src, dest, missing_ok=missing_ok, before=None, sync=sync)
        # Two threads failing files onto one free name would each write the sidecar there; the loser of
        # the rename then removes it, leaving the winner's file without its reason. One at a time.
        with _SIDECAR_MOVES:
            return self._rename_to_free_name(src, dest, missing_ok=missing_ok, before=before, sync=sync)

    def _rename_to_free_name(self, src: Path, dest: Path, *, missing_ok: bool,
                             before: Callable[[Path], object] | None, sync: bool) -> Path | None:
        wanted = dest
        if before is not None:  # the sidecar is written into the destination folder first
            wanted = self._make_parent(wanted)
            if _same_file(src, wanted):  # a link-fallback move killed after its link: finish it, one failure
                before(wanted)
                os.unlink(src)
                if sync:
                    fsync_dir(wanted.parent)
                return wanted
        parents = 0
        for attempt in range(1000):
            # Without a sidecar, try the name itself first: renameat2 refuses a taken name, and the free
            # name is the common case. After a clash, or with a sidecar to place, probe for a free name.
            dest = wanted if attempt == 0 and before is None else self._reserve(wanted)
            if before is not None:
                before(dest)
            try:
                rename_noreplace(src, dest)
            except OSError as exc:
                if before is not None:
                    sidecar_path(dest).unlink(missing_ok=True)
                if isinstance(exc, FileExistsError):
                    continue  # taken, or another process took it between our check and the rename
                if isinstance(exc, FileNotFoundError) and os.path.lexists(src) and (
                        not os.path.isdir(dest.parent) or parents < 5):
                    # The first file of a subfolder; or another gateway on the share made that folder just after
                    # our move missed it, or removed it as emptied just before: make it (again) and move.
                    parents += 1
                    wanted = self._make_parent(wanted)
                    continue
                if exc.errno == errno.ENAMETOOLONG and fit_name(wanted.stem, wanted.suffix) != wanted.name:
                    wanted = wanted.with_name(fit_name(wanted.stem, wanted.suffix))  # the suffix stays
                    continue
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.lexists(src):
                    # A file holds a folder's name there (sent/CT1 is a file, sending/CT1/IM0001 comes):
                    # the folder gets a free name instead, sent/CT1~1/IM0001.
                    wanted = self._free_folders(wanted)
                    continue
                if isinstance(exc, FileNotFoundError) and missing_ok and (not os.path.lexists(src) or parents >= 5):
                    # Gone (another gateway took it: a share's cache may still show it for a moment): not ours.
                    return None
                if exc.errno == errno.EXDEV:
                    raise SpoolError(f"{src} -> {dest}: crosses filesystems; keep the watch root on one "
                                     "filesystem") from None
                raise
            # One fsync makes the rename durable: on journaling filesystems (ext4, xfs) it commits the
            # transaction holding both directory entries. Were it lost in a power cut, the file would be
            # found in its old folder and sent again (a duplicate, accepted as delivered), never lost.
            if sync:
                fsync_dir(dest.parent)
            return dest
        raise SpoolError(f"cannot find a free name for {dest}: clean up {dest.parent}")


    def _make_parent(self, dest: Path) -> Path:
        """Create the folder of `dest`; where a file holds a folder's name, the folder gets a free one."""
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            return dest
        except (FileExistsError, NotADirectoryError):
            dest = self._free_folders(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            return dest

    def _free_folders(self, dest: Path) -> Path:
        """`dest` with every folder below its spool folder that a file (not a folder) holds renamed to a free
        ~N name: sent/CT1/IM0001, sent/CT1 a file -> sent/CT1~1/IM0001."""
        rel = self.relative(dest)
        current = Path(os.fspath(dest)[:-len(os.fspath(rel)) - 1])
        for part in rel.parts[:-1]:
            candidate, n = current / part, 0
            while os.path.lexists(candidate) and not stat.S_ISDIR(os.lstat(candidate).st_mode):
                n += 1
                candidate = current / fit_name(part, f"~{n}")
            current = candidate
        return current / rel.name

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


def sync_dirs(paths: Iterable[Path]) -> None:
    """fsync the directories holding `paths`, each once: the group commit of a batch of renames."""
    for directory in {p.parent for p in paths}:
        fsync_dir(directory)


def sidecar_path(path: Path) -> Path:
    """Where the reason for a failed file is kept: <name>.error.json beside it."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: Path, error: dict[str, Any]) -> Path:
    """Write <name>.error.json atomically (temp file, fsync, rename)."""
    side = sidecar_path(path)
    body = dict(error)
    body.setdefault("file", path.name)
    body.setdefault("time", now_iso())
    # Not named after the file: a long name would make the temp name too long (ENAMETOOLONG).
    tmp = side.with_name(f".relaypacs-sidecar.{os.getpid()}-{threading.get_ident()}.tmp")
    side.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, side)
    return side


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar of a failed file, or None."""
    try:
        return json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def now_iso() -> str:
    """The current UTC time, ISO 8601, for sidecars and journals."""
    return iso_time(time.time())


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


_CLASH = re.compile(r"~\d+(?=(\.[^.]*)?$)")


def clashed(path: Path, n: int) -> Path:
    """The n-th name a clash gives `path`: a.dcm -> a~n.dcm (what `unclashed` undoes), its stem cut to fit
    NAME_MAX."""
    return path.with_name(fit_name(path.stem, f"~{n}{path.suffix}"))


def fit_name(stem: str, tail: str = "") -> str:
    """`stem + tail`, the stem cut (on a character boundary) so that the name, and its sidecar's, fit
    NAME_MAX bytes in UTF-8: the tail (~N, suffix) is what tells names apart, so it stays."""
    room = NAME_MAX - len(SIDECAR_SUFFIX) - len(tail.encode("utf-8", "surrogateescape"))
    if room < 1:  # an absurd suffix: keep only the ~N of the tail
        return fit_name(stem + tail, "")
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return stem + tail
    return raw[:room].decode("utf-8", "ignore") + tail


def valid_name(name: str) -> str:
    """A name that is valid UTF-8: bytes that are not (an SMB client's Latin-1) are read as cp1252, which
    is what such a client meant, else Latin-1; the result is cut to fit NAME_MAX."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:  # os.listdir gave undecodable bytes as surrogates
        pass
    raw = os.fsencode(name)
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are not cp1252
        text = raw.decode("latin-1")
    path = Path(text)
    return fit_name(path.stem, path.suffix) if path.suffix else fit_name(text)


def valid_path(rel: Path) -> Path:
    """`rel` with each component made valid UTF-8 (`valid_name`)."""
    text = os.fspath(rel)
    try:
        text.encode("utf-8")
        return rel  # the common case: one check, no per-component work
    except UnicodeEncodeError:
        return Path(*(valid_name(part) for part in rel.parts))


def printable(path: Path | str) -> str:
    """A path for a log line, bytes that are not UTF-8 escaped (\\xe9)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def unclashed(name: str) -> str:
    """The name before a clash gave it a ~N: a~1.dcm -> a.dcm (a name without one is itself)."""
    return _CLASH.sub("", name, count=1)


class Namesakes:
    """Files by the name they had before a clash gave them a ~N (a~1.dcm -> a.dcm): each folder is listed
    once, however many names are looked up in it."""

    def __init__(self) -> None:
        self._folders: dict[Path, dict[str, list[Path]]] = {}

    def of(self, path: Path) -> list[Path]:
        """`path` and the files a name clash gave its ~N names (a.dcm, a~1.dcm, ...), those that exist."""
        index = self._folders.get(path.parent)
        if index is None:
            index = self._folders[path.parent] = {}
            try:
                names = os.listdir(path.parent)
            except OSError:
                names = []
            for name in names:  # under its own name too: a modality may name a file scan~5.dcm itself
                for key in {name, unclashed(name)}:
                    index.setdefault(key, []).append(path.parent / name)
        found = set(index.get(path.name, []))
        if clashed(path, 1).name != f"{path.stem}~1{path.suffix}":
            # Long enough for its ~N names (and its name in failed/) to be cut: those unclashed is blind to.
            found.update(p for paths in index.values() for p in paths if _cut_from(p.name, path.name))
        return sorted(found)


def _cut_from(name: str, full: str) -> bool:
    """True when `name` is `full` cut by `fit_name` (failed/, or a clash's ~N name)."""
    stem = Path(unclashed(name)).stem
    return fit_name(Path(full).stem, name[len(stem):]) == name
