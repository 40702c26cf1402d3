"""Names the spool gives files: a clash's ~N (a~1.dcm), cut to fit NAME_MAX, made valid UTF-8; and the files a
name clash renamed (Namesakes)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from relaypacsd.sidecars import SIDECAR_SUFFIX

NAME_MAX = 255  # bytes of one name (Linux, most filesystems); names we make are cut to fit, sidecar suffix included

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
    if is_valid_utf8(rel):
        return rel  # the common case: one check, no per-component work
    return Path(*(valid_name(part) for part in rel.parts))


def is_valid_utf8(path: str | os.PathLike[str]) -> bool:
    """True when a path's text is valid UTF-8: no byte the file system gave it that UTF-8 cannot say."""
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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
