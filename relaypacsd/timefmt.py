"""Times as sidecars, the journal's history and `status` write them: UTC, ISO 8601, to the second."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import overload


@overload
def iso_time(t: float) -> str: ...
@overload
def iso_time(t: None) -> None: ...
def iso_time(t: float | None) -> str | None:
    """`t` (seconds since the epoch) as ISO 8601 UTC; None (never) stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
