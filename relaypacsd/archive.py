"""Unpack a .zip dropped into an inbox, safely, into sending/<zip name>/...

Rules: no absolute paths, no `..`, no symlinks or other special entries, limits on the number of
entries, the total unpacked size and the compression ratio (zip bombs); sizes are counted while
writing, never trusted from the headers. Everything is unpacked into a temp folder inside the same
watch root first (one filesystem: each member then reaches sending/ by one rename); a bad archive
moves nothing and goes to failed/ with a sidecar.

Crash safety: the commit point is one rename, of the zip itself from sending/ into the temp folder,
beside a manifest saying where it came from. Killed before it, the temp folder is removed at start-up
and the zip, still in sending/, is unpacked again. Killed after it, start-up moves the members that
are still in the temp folder to sending/ and the zip to sent/. Either way each member reaches sending/
exactly once. Two unpacks of one zip (a reload that outlived its wait) cannot both commit.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from relaypacsd.dicomfile import ZIP_MAGIC
from relaypacsd.errors import InvalidDicomError, RelayPacsError
from relaypacsd.renames import fsync_dir, rename_noreplace, same_file, sync_dirs
from relaypacsd.spool import Spool

TEMP_PREFIX = ".relaypacs-unzip-"
MANIFEST = ".relaypacs-manifest.json"  # in the temp folder: the zip's place, relative to sending/
SOURCE = ".relaypacs-source.zip"  # the zip, once moved into the temp folder: the unpack is committed
JUNK = ("__MACOSX/", ".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass(frozen=True)
class Limits:
    """Caps for one archive."""

    max_entries: int = 20000
    max_total_bytes: int = 8 * 1024**3
    max_ratio: float = 200.0  # unpacked / packed, per entry and for the whole archive
    ratio_floor_bytes: int = 1024 * 1024  # small entries may compress well (a blank DICOM header)


class BadArchive(InvalidDicomError):
    """The zip cannot be unpacked safely; the message says why."""


class UnpackInterrupted(RelayPacsError):
    """Moving a committed unpack's files on failed: they wait in its temp folder for the next start."""


def is_zip(path: Path) -> bool:
    """True when the file starts with a zip local-file header and is not a DICOM Part-10 file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    # The 128-byte preamble is free for applications (PS3.10 7.1): one may start it with PK\x03\x04 (a
    # DICOM/zip polyglot), so 'DICM' at byte 128 decides first.
    return head[:4] == ZIP_MAGIC and head[128:132] != b"DICM"


def _safe_name(name: str) -> PurePosixPath:
    if "\\" in name:
        name = name.replace("\\", "/")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BadArchive(f"entry {name!r} has an absolute path: refused (path traversal)")
    if any(part in ("..",) for part in p.parts):
        raise BadArchive(f"entry {name!r} climbs out with '..': refused (path traversal)")
    parts = [part for part in p.parts if part not in ("", ".")]
    if not parts:
        raise BadArchive(f"entry {name!r} has an empty name")
    return PurePosixPath(*parts)


def unpack(zip_path: Path, dest: Path, limits: Limits = Limits()) -> list[Path]:
    """Unpack into the existing empty folder `dest`; return the files written. Raise BadArchive."""
    packed = max(1, zip_path.stat().st_size)
    written: list[Path] = []
    total = 0
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BadArchive(f"not a readable zip archive ({exc}): create it again") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise BadArchive(f"{len(infos)} entries, more than the limit of {limits.max_entries}: split the archive")
        for info in infos:
            if any(j in info.filename for j in JUNK):
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode and stat.S_ISLNK(mode):
                raise BadArchive(f"entry {info.filename!r} is a symbolic link: refused")
            if info.is_dir():
                continue
            if mode and not stat.S_ISREG(mode):
                raise BadArchive(f"entry {info.filename!r} is not a regular file: refused")
            if info.flag_bits & 0x1:
                raise BadArchive(f"entry {info.filename!r} is encrypted: send an archive without a password")
            rel = _safe_name(info.filename)
            target = dest.joinpath(*rel.parts)
            if target.is_dir():
                raise BadArchive(f"entry {info.filename!r} is a file where the archive also has a folder of that "
                                 "name: refused (re-create the archive with distinct names)")
            if target.exists():
                raise BadArchive(f"entry {info.filename!r} appears twice in the archive")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # S1 and S1/IM2 both in the archive
                raise BadArchive(f"entry {info.filename!r} needs a folder where the archive also has a file of that "
                                 "name: refused (re-create the archive with distinct names)") from None
            size = 0
            try:
                with zf.open(info) as src, open(target, "xb") as out:
                    while True:
                        chunk = src.read(1024 * 1024)
                        if not chunk:
                            break
                        size += len(chunk)
                        total += len(chunk)
                        if size > info.file_size:
                            raise BadArchive(f"entry {info.filename!r} unpacks larger than its header says: refused")
                        if total > limits.max_total_bytes:
                            raise BadArchive(f"unpacks to more than {limits.max_total_bytes} bytes: over the limit")
                        if size > limits.ratio_floor_bytes and size / max(1, info.compress_size) > limits.max_ratio:
                            raise BadArchive(f"entry {info.filename!r} compresses more than {limits.max_ratio:g}:1 "
                                             "(zip bomb?): refused")
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
                if isinstance(exc, BadArchive):
                    raise
                raise BadArchive(f"entry {info.filename!r} cannot be unpacked ({exc})") from None
            written.append(target)
        if total > limits.ratio_floor_bytes and total / packed > limits.max_ratio:
            raise BadArchive(f"the archive compresses more than {limits.max_ratio:g}:1 (zip bomb?): refused")
    return written


def unpack_to_sending(spool: Spool, zip_path: Path, limits: Limits = Limits()) -> list[Path]:
    """Unpack a zip that sits in sending/ into sending/<zip name without .zip>/..., move the zip to sent/,
    and return the new files. Nothing reaches sending/ unless the whole archive unpacked within the limits;
    [] when another unpack of the same zip committed first."""
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=spool.root))
    try:
        (tmp / "members").mkdir()
        unpack(zip_path, tmp / "members", limits)
        _write_manifest(tmp, spool.relative(zip_path))
        rename_noreplace(zip_path, tmp / SOURCE)  # the commit point
    except FileNotFoundError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.filename is not None and Path(exc.filename) == zip_path and not zip_path.exists():
            return []  # another unpack of this zip committed first, and moves its members: ours are dropped
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(tmp)
    fsync_dir(zip_path.parent)
    # Committed: from here the temp folder may hold the only copy of members. Were moving them to fail,
    # it stays for start-up to finish (resume_unpacks); it is removed only once they are all out.
    try:
        moved = _finish_unpack(spool, tmp)
    except (OSError, RelayPacsError) as exc:
        raise UnpackInterrupted(f"unpacking {spool.relative(zip_path)} stopped after some files reached sending/ "
                                f"({exc}): the zip and the other files wait in {tmp}; fix the cause (permissions, "
                                "free space), then restart the service: its start moves them on") from None
    shutil.rmtree(tmp, ignore_errors=True)
    return moved


def resume_unpacks(spool: Spool, quiet_for: float = 0.0) -> list[Path]:
    """At start-up: finish the unpacks a crash interrupted after their commit, drop the others (their zip is
    still in sending/ and is unpacked again). Returns the members moved to sending/ now. With several gateways
    on the spool, an unpack touched in the last `quiet_for` seconds may be another node's, under way: left."""
    moved: list[Path] = []
    for entry in os.scandir(spool.root):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_dir(follow_symlinks=False):
            tmp = Path(entry.path)
            if quiet_for and _touched_within(tmp, quiet_for):
                continue
            if (tmp / SOURCE).exists():
                moved += _finish_unpack(spool, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    return moved


def _touched_within(tmp: Path, seconds: float) -> bool:
    """True when anything below `tmp` changed in the last `seconds` (by the share's clock, as the files say)."""
    newest = 0.0
    for dirpath, _dirs, names in os.walk(tmp):
        for name in [".", *names]:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    return time.time() - newest < seconds


def _write_manifest(tmp: Path, zip_rel: Path) -> None:
    with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump({"zip": zip_rel.as_posix()}, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _finish_unpack(spool: Spool, tmp: Path) -> list[Path]:
    """Move a committed unpack's members to sending/<folder>/ (one rename each), then its zip to sent/."""
    zip_rel = Path(json.loads((tmp / MANIFEST).read_text(encoding="utf-8"))["zip"])
    if same_file(spool.sending / zip_rel, tmp / SOURCE):
        # A commit by the link fallback (NFS) killed before its unlink: the zip must leave sending/ now, or
        # recovery unpacks it again and every member is sent twice.
        os.unlink(spool.sending / zip_rel)
    folder = zip_rel.with_suffix("") if zip_rel.suffix.lower() == ".zip" else zip_rel.with_name(zip_rel.name + ".unzipped")
    n = 0
    while os.path.lexists(spool.sending / folder) and not (spool.sending / folder).is_dir():
        n += 1  # a file holds that name (CT1 beside CT1.zip): the members go to CT1~1/ instead
        folder = folder.with_name(f"{zip_rel.with_suffix('').name}~{n}")
    members = tmp / "members"
    moved = []
    for dirpath, _dirs, names in sorted(os.walk(members)):
        for name in sorted(names):
            f = Path(dirpath) / name
            m = spool._move(f, spool.sending / folder / f.relative_to(members), missing_ok=True, sync=False)
            if m is not None:
                moved.append(m)
    sync_dirs(moved)
    spool._move(tmp / SOURCE, spool.sent / zip_rel, missing_ok=True)
    return moved

