"""The types the pipeline and every sender share, whatever the protocol: a part to send, and a sender.

Neutral ground (httpx's `_models.py` habit): delivery, STOW-RS and C-STORE import these, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relaypacsd.outcomes import InstanceResult


@dataclass(frozen=True)
class Part:
    """One file to send: its path, SOPInstanceUID and the size it had when it was batched."""

    path: Path
    sop_uid: str
    size: int


class Sender(Protocol):
    """What the pipeline needs from a destination, whatever the protocol (STOW-RS, C-STORE)."""

    name: str
    target: str  # the URL or host:port shown in logs

    def send(self, parts: list[Part]) -> tuple[list[InstanceResult], int | None]:
        """Store the parts; return one result per part and the HTTP status (None for DIMSE)."""

    def probe(self) -> None:
        """Raise PacsError unless the destination answers and accepts our credentials."""
