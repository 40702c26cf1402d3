"""The charts' memory: one sample per minute for the last day, in a ring (no per-file work, nothing on disk).

Each sample holds, per PACS, the instances delivered in that minute (the difference of the journal's
delivered counter, so a file counts once, duplicates included) and the files waiting at the minute's last look.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

DAY_MINUTES = 24 * 60
DAY_STEP = 10  # minutes per point of the day chart


@dataclass
class Minute:
    minute: int  # minutes since the epoch
    delivered: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)


class Samples:
    """Per-minute samples, fed every few seconds by `record`; read by `series`. Thread-safe."""

    def __init__(self, minutes: int = DAY_MINUTES):
        self._ring: deque[Minute] = deque(maxlen=minutes)
        self._totals: dict[str, int] | None = None
        self._lock = threading.Lock()

    def record(self, now: float, delivered_totals: Mapping[str, int], waiting: Mapping[str, int]) -> None:
        """One look: the journal's delivered counter per PACS and the files waiting per PACS, at wall time `now`."""
        minute = int(now // 60)
        with self._lock:
            last = self._ring[-1] if self._ring else None
            if last is None or last.minute != minute:
                last = Minute(minute)
                self._ring.append(last)
            # The first look is the base: what was delivered before the dashboard started is not charted.
            before = dict(delivered_totals) if self._totals is None else self._totals
            for name, total in delivered_totals.items():
                # A PACS without a counter at the last look got it since (its first delivery): all of it is new.
                # A counter that went down (a new journal) starts again from its value: never negative.
                step = total - before.get(name, 0)
                last.delivered[name] = last.delivered.get(name, 0) + max(0, step)
            last.waiting = dict(waiting)
            self._totals = dict(delivered_totals)

    def series(self, span: str, now: float) -> dict[str, Any]:
        """The chart of the last hour (one point a minute) or day (one per DAY_STEP minutes).

        Points without a sample (the daemon was not running) are None, so a chart shows the gap."""
        step = 1 if span == "hour" else DAY_STEP
        points = 60 if span == "hour" else DAY_MINUTES // DAY_STEP
        end = int(now // 60) // step * step  # the current (partial) bucket is the last point
        starts = [end - (points - 1 - i) * step for i in range(points)]
        with self._lock:
            ring = list(self._ring)
        names = sorted({n for m in ring for n in (*m.delivered, *m.waiting)})
        delivered: dict[str, list[int | None]] = {n: [None] * points for n in names}
        waiting: dict[str, list[int | None]] = {n: [None] * points for n in names}
        first = starts[0]
        for m in ring:
            i = (m.minute - first) // step
            if not 0 <= i < points:
                continue
            for n in names:
                if n in m.delivered:
                    delivered[n][i] = (delivered[n][i] or 0) + m.delivered[n]
                if n in m.waiting:  # the bucket's latest look
                    waiting[n][i] = m.waiting[n]
        return {"span": span, "step_minutes": step, "times": [s * 60 for s in starts],
                "delivered": delivered, "waiting": waiting}
