"""Helpers shared by the operator commands: config, PACS choice, input checks, tables, progress."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from relaypacsd.config import Config, PacsConfig, find_config_path, load_config
from relaypacsd.errors import EXIT_FAIL, EXIT_OK, RelayPacsError
from relaypacsd.uids import is_uid  # not dicomfile's pydicom: a quick command starts in a tenth of the time

__all__ = ["EXIT_FAIL", "EXIT_OK",  # the commands import the exit codes from here too
           "UsageError", "load", "check_uid", "pick_pacs", "targets", "short", "table", "print_json",
           "Progress", "human_age", "expand_paths", "expand_paths_from", "place"]


class UsageError(RelayPacsError):
    """Bad input on the command line (unknown PACS, malformed UID or date, missing path)."""


def load(args: argparse.Namespace) -> Config:
    """The effective config for this command."""
    return load_config(find_config_path(getattr(args, "config", None)))


def check_uid(uid: str, what: str = "UID") -> str:
    """Return `uid` or raise UsageError: digits and dots, at most 64 characters."""
    uid = uid.strip()
    if not is_uid(uid):
        raise UsageError(f"{what} {uid!r} is not a DICOM UID (digits and dots, at most 64 characters, e.g. 1.2.840.113619.2.55...)")
    return uid


def pick_pacs(config: Config, name: str | None) -> PacsConfig:
    """The named PACS, or the first active one."""
    if name:
        if name not in config.pacs:
            known = ", ".join(sorted(config.pacs)) or "none"
            raise UsageError(f"unknown PACS {name!r} (configured: {known}): use one of those names, "
                             f"or add a [pacs.{name}] table")
        return config.pacs[name]
    active = config.active()
    if not active:
        raise UsageError("no PACS configured: set ORTHANC_URL (or a [pacs.NAME] table with a url) and ACTIVE_PACS")
    return active[0]


def targets(config: Config, name: str | None) -> list[PacsConfig]:
    """The named PACS only, or every active PACS."""
    if name:
        return [pick_pacs(config, name)]
    active = config.active()
    if not active:
        raise UsageError("no active PACS: set ACTIVE_PACS / ORTHANC_URL, or name one with --to")
    return active


def short(text: str, n: int = 100) -> str:
    """`text` on one line, cut to `n` characters with '...' when longer."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table, columns left-aligned, two spaces apart."""
    rows = [["" if v is None else str(v) for v in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, v in enumerate(r):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


class Progress:
    """A one-line progress report on stderr, rewritten in place on a terminal."""

    def __init__(self, label: str, total: int | None = None, stream: Any = None):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = -1

    def update(self, done: int, extra: str = "") -> None:
        if done == self.last:
            return
        self.last = done
        if not self.tty and self.total and done not in (self.total,) and done % max(1, self.total // 10):
            return  # in logs and pipes: about ten lines, not one per file
        total = f"/{self.total}" if self.total else ""
        bar = ""
        if self.total:
            filled = int(20 * done / max(1, self.total))
            bar = "[" + "#" * filled + "." * (20 - filled) + "] "
        text = f"{self.label}: {bar}{done}{total}{(' ' + extra) if extra else ''}"
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.last >= 0:
            self.stream.write("\n")
            self.stream.flush()


def human_age(seconds: float | None) -> str:
    """'45s', '12m05s', '3h07m', '2d04h'."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """Files named, and every file below folders named (sorted), hidden files and sidecars skipped."""
    return [f for f, _ in expand_paths_from(paths)]


def expand_paths_from(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """As expand_paths, each file with the folder it was found below (its own folder for a file named)."""
    out: list[tuple[Path, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out += [(f, p) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")
                    and not f.name.endswith(".error.json")]
        elif p.is_file():
            out.append((p, p.parent))
        else:
            raise UsageError(f"{raw}: no such file or folder")
    return out


def place(path: Path, base: Path, roots: Iterable[Path], watch: str | None = None) -> tuple[str, str]:
    """(watch root, path below its inbox/) for routing a file a command was given: its place in a watch root
    when it lies in one (inbox/, sending/, sent/ or failed/), else `watch` ('' unknown) and its path below
    `base`, the folder it was found in."""
    absolute = path.absolute()
    for root in roots:
        for folder in ("inbox", "sending", "sent", "failed"):
            try:
                return str(root), absolute.relative_to((root / folder).absolute()).as_posix()
            except ValueError:
                continue
    try:
        return watch or "", absolute.relative_to(base.absolute()).as_posix()
    except ValueError:
        return watch or "", path.name
