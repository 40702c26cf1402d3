"""Unpack a .zip dropped into an inbox, safely, into sending/<zip name>/...

Rules: no absolute paths, no `..`, no symlinks or other special entries, limits on the number of
entries, the total unpacked size and the compression ratio (zip bombs); sizes are counted while
writing, never trusted from the headers. Everything is unpacked into a temp folder inside the same
watch root first (one filesystem: each member then reaches sending/ by one rename); a bad archive
moves nothing and goes to failed/ with a sidecar.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from relaypacsd.errors import InvalidDicomError
from relaypacsd.spool import Spool

ZIP_MAGIC = b"PK\x03\x04"
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


def is_zip(path: Path) -> bool:
    """True when the file starts with a zip local-file header."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == ZIP_MAGIC
    except OSError:
        return False


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
            if target.exists():
                raise BadArchive(f"entry {info.filename!r} appears twice in the archive")
            target.parent.mkdir(parents=True, exist_ok=True)
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
    """Unpack a zip that sits in sending/ into sending/<zip name without .zip>/...; return the new files.

    Nothing reaches sending/ unless the whole archive unpacked within the limits."""
    rel = spool.relative(zip_path)
    folder = rel.with_suffix("") if rel.suffix.lower() == ".zip" else rel.with_name(rel.name + ".unzipped")
    tmp = Path(tempfile.mkdtemp(prefix=".relaypacs-unzip-", dir=spool.root))
    try:
        files = unpack(zip_path, tmp, limits)
        moved = []
        for f in files:
            dest = spool.sending / folder / f.relative_to(tmp)
            moved.append(spool._move(f, dest, missing_ok=False))  # same filesystem: one rename each
        return [m for m in moved if m is not None]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cleanup_stale(spool: Spool) -> None:
    """Remove temp folders left by a crash during an unpack (their zip is still in sending/)."""
    for entry in os.scandir(spool.root):
        if entry.name.startswith(".relaypacs-unzip-") and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
