"""Durable renames that never overwrite: renameat2(RENAME_NOREPLACE), else link and unlink; the fsync of the
folders that makes them survive a power cut; and the move to a free name (a.dcm taken: a~1.dcm)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from pathlib import Path
from typing import Callable, Iterable

from relaypacsd.errors import SpoolError
from relaypacsd.names import clashed, fit_name
from relaypacsd.sidecars import sidecar_path

Relative = Callable[[Path], Path]  # a spooled file's path below its spool folder (Spool.relative)

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


_SIDECAR_MOVES = threading.Lock()  # serialises this process's moves that place a sidecar (see move_to_free_name)


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
        if not same_file(src, dst):
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


def same_file(a: Path, b: Path) -> bool:
    """True when both names stand for one inode (a link fallback's two names)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def sync_dirs(paths: Iterable[Path]) -> None:
    """fsync the directories holding `paths`, each once: the group commit of a batch of renames."""
    for directory in {os.path.dirname(p) for p in paths}:  # text: a Path.parent per file cost more than the fsync
        fsync_dir(Path(directory))


def free_name(dest: Path) -> Path:
    """A free name near `dest`: a same-named file never overwrites another (a.dcm, a~1.dcm, ...)."""
    candidate, n = dest, 0
    while os.path.lexists(candidate) or os.path.lexists(sidecar_path(candidate)):
        n += 1
        candidate = clashed(dest, n)
    return candidate

def move_to_free_name(src: Path, dest: Path, relative: Relative, *, missing_ok: bool,
                      before: Callable[[Path], object] | None = None, sync: bool = True) -> Path | None:
    """Rename `src` to `dest` or, taken, the first free ~N name near it; `before(dest)` (the sidecar) first, under
    a lock. Makes missing folders; None when `src` is gone and `missing_ok`. `relative`: the spool's."""
    if before is None:
        return _rename_to_free_name(src, dest, relative, missing_ok=missing_ok, before=None, sync=sync)
    # Two threads failing files onto one free name would each write the sidecar there; the loser of
    # the rename then removes it, leaving the winner's file without its reason. One at a time.
    with _SIDECAR_MOVES:
        return _rename_to_free_name(src, dest, relative, missing_ok=missing_ok, before=before, sync=sync)

def _rename_to_free_name(src: Path, dest: Path, relative: Relative, *, missing_ok: bool,
                         before: Callable[[Path], object] | None, sync: bool) -> Path | None:
    wanted = dest
    if before is not None:  # the sidecar is written into the destination folder first
        wanted = make_parent(wanted, relative)
        if same_file(src, wanted):  # a link-fallback move killed after its link: finish it, one failure
            before(wanted)
            os.unlink(src)
            if sync:
                fsync_dir(wanted.parent)
            return wanted
    parents = 0
    for attempt in range(1000):
        # Without a sidecar, try the name itself first: renameat2 refuses a taken name, and the free
        # name is the common case. After a clash, or with a sidecar to place, probe for a free name.
        dest = wanted if attempt == 0 and before is None else free_name(wanted)
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
                wanted = make_parent(wanted, relative)
                continue
            if exc.errno == errno.ENAMETOOLONG and fit_name(wanted.stem, wanted.suffix) != wanted.name:
                wanted = wanted.with_name(fit_name(wanted.stem, wanted.suffix))  # the suffix stays
                continue
            if exc.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.lexists(src):
                # A file holds a folder's name there (sent/CT1 is a file, sending/CT1/IM0001 comes):
                # the folder gets a free name instead, sent/CT1~1/IM0001.
                wanted = free_folders(wanted, relative)
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

def make_parent(dest: Path, relative: Relative) -> Path:
    """Create the folder of `dest`; where a file holds a folder's name, the folder gets a free one."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest
    except (FileExistsError, NotADirectoryError):
        dest = free_folders(dest, relative)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

def free_folders(dest: Path, relative: Relative) -> Path:
    """`dest` with every folder below its spool folder that a file (not a folder) holds renamed to a free
    ~N name: sent/CT1/IM0001, sent/CT1 a file -> sent/CT1~1/IM0001."""
    rel = relative(dest)
    current = Path(os.fspath(dest)[:-len(os.fspath(rel)) - 1])
    for part in rel.parts[:-1]:
        candidate, n = current / part, 0
        while os.path.lexists(candidate) and not stat.S_ISDIR(os.lstat(candidate).st_mode):
            n += 1
            candidate = current / fit_name(part, f"~{n}")
        current = candidate
    return current / rel.name
