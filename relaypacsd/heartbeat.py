"""Reading the liveness file the daemon writes: kept light, as `health` runs often (Docker HEALTHCHECK)."""

from __future__ import annotations

import os
import socket


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
