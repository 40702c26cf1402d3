"""The reason beside a failed file: <name>.error.json, written atomically before the file reaches failed/."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from relaypacsd.timefmt import iso_time

SIDECAR_SUFFIX = ".error.json"


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
