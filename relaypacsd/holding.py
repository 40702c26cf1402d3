"""What the engine holds: valid files submitted by validation or taken from the journal's backlog, each queued
at the PACS that owe it, and the files it lets go back to the backlog. The window (window.py) says how many
may be held; this says what becomes of each file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from relaypacsd.dicomfile import DicomInfo
from relaypacsd.eviction import let_go
from relaypacsd.fate import owed
from relaypacsd.journal import Backlogged, DeliveryRow, Ensure, FileFacts
from relaypacsd.queues import Item
from relaypacsd.routing import RouteDecision, Unrouted, inactive_reason, kept_inactive_reason, unmatched_reason
from relaypacsd.spool import Spool
from relaypacsd.window import Admission

if TYPE_CHECKING:
    from relaypacsd.delivery import Engine


@dataclass  # not frozen: one per file (see journal.DeliveryRow)
class Valid:
    """A file validation found valid, with its route (None without routing), ready to be held."""

    path: Path
    spool: Spool
    info: DicomInfo
    route: RouteDecision | None = None


class Holder:
    """The engine's side of the window: submissions, take-ins from the backlog, let-gos."""

    def __init__(self, engine: "Engine", spools: list[Spool], revalidate: Callable[[Spool, Path], None] | None):
        self.engine = engine
        self.spools = spools  # where files taken from the backlog live
        self._revalidate = revalidate  # a file the backlog cannot describe (rows of an older journal) is read again

    def submit(self, path: Path, spool: Spool, info: DicomInfo, route: RouteDecision | None = None) -> None:
        """Hold a valid file in sending/ and queue it for every destination that has not confirmed it: every
        active one, or with `route` (routing configured) its route's. A file that has journal rows keeps the
        destinations it was given (a reload's routes apply to files claimed after it); Unrouted when it is
        left with no active destination (no route matched, or none of its PACS is active). When the active
        window is full, or files wait in the backlog before it, it waits there (its rows say so)."""
        refused = self.submit_many([Valid(path, spool, info, route)])[0]
        if refused is not None:
            raise refused

    def submit_many(self, files: list["Valid"]) -> list[Unrouted | None]:
        """`submit` for several files with one journal commit (`Journal.ensure_many`): for each, None, or the
        Unrouted that leaves it with no active destination. A journal error submits none of them."""
        window, dests = self.engine.window, self.engine.destinations
        admissions: list[Admission] = []
        try:
            asks = []
            for f in files:
                admissions.append(window.admit(f.path))
                asks.append(self._ensure_of(f, backlog=admissions[-1] is Admission.BACKLOG and bool(dests)))
            found = self.engine.journal.ensure_many(asks)
        except BaseException:
            for admission in admissions:
                if admission is Admission.IN:
                    window.cancel()
            raise
        out: list[Unrouted | None] = []
        for f, admission, rows in zip(files, admissions, found):
            if f.route is not None and dests:
                try:
                    _check_routed(rows, dests, f.route)
                except Unrouted as exc:
                    if admission is Admission.IN:
                        window.cancel()
                    out.append(exc)
                    continue
            out.append(None)
            self._hold(f, admission, rows)
        return out

    def _ensure_of(self, f: "Valid", backlog: bool) -> Ensure:
        """What the journal is asked to ensure for a valid file: its rows at every active PACS, or (routed) at its
        route's active ones, kept as they are when it has rows."""
        info, dests = f.info, self.engine.destinations
        facts = FileFacts(info.sop_class_uid, info.study_instance_uid, info.series_instance_uid, info.size, info.digest,
                          info.patient_id, info.accession_number, info.modality)
        if f.route is None or not dests:  # PACS_ENABLED=false: validated and parked, as without routes
            return Ensure(str(f.path), tuple(dests), sop=info.sop_instance_uid, facts=facts, backlog=backlog)
        return Ensure(str(f.path), tuple(d for d in f.route.destinations if d in dests), sop=info.sop_instance_uid,
                      route=f.route.name, keep=True, facts=facts, backlog=backlog)

    def _hold(self, f: "Valid", admission: Admission, rows: dict[str, DeliveryRow]) -> None:
        """After its rows are written: queue the file, or leave it in the backlog its admission put it in."""
        window, dests = self.engine.window, self.engine.destinations
        if admission is Admission.HELD:
            return  # already queued (a rescan of sending/ found it again)
        if admission is Admission.BACKLOG:
            owed_at = [d for d, r in rows.items() if d in dests and owed(r.state)]
            if owed_at:
                window.spilled(owed_at)
                return
            if not dests:
                return  # PACS_ENABLED=false: validated and left in sending/; the window holds what it can
        self.queue(f.path, f.spool, f.info, rows, reserved=admission is Admission.IN, routed=f.route is not None)

    def queue(self, path: Path, spool: Spool, info: DicomInfo, rows: dict[str, DeliveryRow], reserved: bool,
              routed: bool, now_due: bool = False) -> None:
        """Hold a file in the window and queue it at each destination that owes it (`now_due`: at once, whatever
        its next try said); one settled everywhere goes to the finisher. `routed`: it goes to the destinations
        its rows name (its route's), not to every active one."""
        dests = self.engine.destinations
        targets = frozenset(d for d in rows if d in dests) if routed and dests else frozenset()
        route = next((r.route for r in rows.values() if r.route), "") if routed else ""  # '' for rows before routing
        now_wall, now_mono = time.time(), time.monotonic()
        first_seen = min((r.first_seen for r in rows.values()), default=now_wall)
        born = now_mono - max(0.0, now_wall - first_seen)
        pending = {d for d, r in rows.items() if d in dests and owed(r.state)}
        item = Item(path=path, spool=spool, info=info, born=born, pending=set(pending), first_seen=first_seen,
                    route=route, targets=targets)
        if not self.engine.window.add(item, reserved):
            return  # already queued (a rescan of sending/ found it again)
        if not dests:
            return  # PACS_ENABLED=false: validated and parked in sending/
        if not pending:
            item.done = True
            self.engine._hand_over([item])
            return
        # A PACS that is down first: one that is up may send and settle the file at once, and the look whether the
        # others can send it soon (let_go) must find it queued there already.
        for name in sorted(pending, key=lambda n: dests[n].healthy):
            row = rows[name]
            at = now_mono + max(0.0, row.next_try - now_wall) if row.state == "waiting" and not now_due else 0.0
            dests[name].put(item, at)

    def take_in(self, page: list[Backlogged], now_due: bool) -> None:
        """Hold and queue the files the refill took from the backlog, described by their rows (not read again)."""
        for b in page:
            self.engine.window.taken([d for d, r in b.rows.items() if owed(r.state)])
            path = Path(b.path)
            spool = next((s for s in self.spools if path.is_relative_to(s.sending)), None)
            if spool is None:
                continue  # its watch root is no longer configured
            routed = bool(self.engine.config.routes)
            if b.facts is None or (not routed and any(d not in b.rows for d in self.engine.destinations)):
                # Rows an older journal wrote, or a PACS added since: validation reads it and writes its rows.
                if self._revalidate is not None:
                    self._revalidate(spool, path)
                continue
            f = b.facts  # what delivery and its records read (not the transfer syntax: C-STORE reads the file's)
            info = DicomInfo(sop_class_uid=f.sop_class, sop_instance_uid=b.sop, study_instance_uid=f.study,
                             series_instance_uid=f.series, transfer_syntax_uid="", size=f.size, digest=f.digest,
                             patient_id=f.patient_id, accession_number=f.accession, modality=f.modality)
            self.queue(path, spool, info, b.rows, reserved=False, routed=routed, now_due=now_due)

    def held_by_root(self) -> dict[Path, tuple[int, float | None]]:
        """Per watch root: the files known to the engine, held or in the backlog (as counted at the last sweep),
        and the earliest first sighting among them (wall clock): the dashboard's sending/ count and oldest
        waiting file, without a walk."""
        window = self.engine.window
        out: dict[Path, tuple[int, float | None]] = dict(window.under())
        with window.lock:
            items = list(window.items.values())
        for item in items:
            n, first = out.get(item.spool.root, (0, None))
            out[item.spool.root] = (n + 1, item.first_seen if first is None else min(first, item.first_seen))
        return out

    def let_go(self, items: list[Item]) -> int:
        """Put held files that no PACS can send soon (down, or a retry beyond the next sweep) back in the backlog;
        return how many went."""
        engine = self.engine
        gone = let_go(items, engine.destinations, time.monotonic() + engine.config.delivery.retry_sweep_interval)
        if gone:
            # Out of the window before the mark: the refill must not find a file that is still held.
            engine.window.remove(gone)
            engine.journal.to_backlog([str(i.path) for i in gone])
            for item in gone:
                engine.window.spilled(sorted(item.pending))
        return len(gone)


def _check_routed(rows: dict[str, DeliveryRow], dests: Mapping[str, object], route: RouteDecision) -> None:
    """Raise Unrouted when a routed file is left with no active destination."""
    if any(d in dests for d in rows):
        return
    name = next((r.route for r in rows.values() if r.route), "")
    if rows:
        raise Unrouted(kept_inactive_reason(name, sorted(rows)), route, name)
    raise Unrouted(inactive_reason(route) if route.matched else unmatched_reason(route), route)
