"""Reading the liveness file the daemon writes: kept light, as `health` runs often (Docker HEALTHCHECK)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

# The liveness file in state_dir: the daemon writes it, `status` and `health` read it.
HEARTBEAT_FILE = "heartbeat.json"


def heartbeat_path(state_dir: str | Path) -> Path:
    """Where the daemon with this state_dir writes its heartbeat."""
    return Path(state_dir) / HEARTBEAT_FILE


def read_heartbeat(state_dir: str | Path) -> dict | None:
    """The last heartbeat the daemon wrote, or None when there is none or it cannot be read."""
    try:
        beat = json.loads(heartbeat_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def process_gone(beat: dict) -> bool:
    """True if a heartbeat's writer ran on this host (same PID namespace) and its pid no longer exists."""
    pid = beat.get("pid")
    if not isinstance(pid, int) or beat.get("host") != socket.gethostname():
        return False  # written elsewhere (another container, an old heartbeat): only its age counts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, run by another user
        return False
    return False


def write_heartbeat(state_dir: str | Path, body: dict) -> None:
    """Replace the liveness file atomically (a reader never sees half of one); OSError when it cannot."""
    tmp = Path(state_dir) / f".{HEARTBEAT_FILE}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, heartbeat_path(state_dir))
