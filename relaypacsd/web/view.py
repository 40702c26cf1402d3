"""The dashboard's one door into the daemon: its snapshot, its journal's counters, failed/, and the actions.

Figures come from `Daemon.snapshot(kept=True)` (no walk of sent/), the journal's destination counters and
the heartbeat file, cached for CACHE seconds so that any number of open pages cost one look. The actions go
through the library code the command line uses: `requeue.requeue` for a retry, `pauses.set_paused` for a pause.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from loguru import logger

from relaypacsd import failures, pauses
from relaypacsd.commands.common import UsageError
from relaypacsd.commands.status import daemon_state, pacs_entries
from relaypacsd.config import to_dict
from relaypacsd.errors import PauseError, RequeueError
from relaypacsd.requeue import requeue
from relaypacsd.web.samples import Samples

if TYPE_CHECKING:
    from relaypacsd.daemon import Daemon

HISTORY_FILTERS = ("study", "patient", "accession", "sop", "file", "pacs", "outcome", "since", "until")
DEFAULT_HISTORY_LIMIT = 200  # records in one answer unless ?limit= says otherwise
HISTORY_LIMIT = 10_000  # at most, also for limit=0 (a timeline): the CLI's --format csv has no cap
CACHE = 1.0  # seconds a status document or a failed/ listing is reused
SAMPLE_EVERY = 10.0  # seconds between the charts' looks


class DaemonView:
    """What the pages and the API read and do; every method may be called from any thread."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.samples = Samples()
        self._failed_files = failures.FailedFiles()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}

    def _cached(self, key: str, make: Callable[[], Any], ttl: float = CACHE) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        value = make()
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def _drop_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- reading -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The document of `relaypacsd status --json`, from the daemon's memory, plus a "gateway" part."""
        return self._cached("status", self._status)

    def _status(self) -> dict[str, Any]:
        d = self.daemon
        snap = d.snapshot(kept=True)
        try:
            dests, counts = d.journal.destinations(), d.journal.counts()
        except Exception:  # a reload closes the journal under us for a moment: figures come at the next look
            dests, counts = {}, {}
        daemon = daemon_state(d.state_dir)
        daemon.update(running=True, in_flight=snap.in_flight)  # this very process: the heartbeat may be seconds old
        pacs = pacs_entries(d.config, dests, counts, True, d.pauses.paused, snap.time)
        live = {s.name: s for s in snap.destinations}
        for entry in pacs:
            state = live.get(entry["name"])
            if state is not None:  # the engine's own view, newer than the journal's by a probe at most
                entry["queued"] = state.queued
        try:
            nodes = list(d.gateway.nodes())  # every gateway of the spool, as `status` shows them (#14)
        except Exception:  # a reload replaces the gateway under us for a moment
            nodes = []
        return {"daemon": daemon, "watch": [f.to_dict() for f in snap.folders], "pacs": pacs, "nodes": nodes,
                "gateway": {"version": snap.version, "uptime_seconds": round(snap.uptime_seconds),
                            "ready": snap.ready, "alive": snap.alive, "in_flight": snap.in_flight,
                            "sent_this_run": snap.sent, "failed_this_run": snap.failed, "time": snap.time}}

    def healthy(self) -> bool:
        """The daemon runs and every one of its threads is alive (what `relaypacsd health` asks)."""
        return self.daemon.ready.is_set() and self.daemon.alive()

    def sample(self, starting: bool = False) -> bool:
        """One look for the charts (every SAMPLE_EVERY s): delivered counters and files waiting per PACS.
        False while the daemon is not ready (reloading): the sampler looks again soon. `starting`: the first
        look, before the daemon's pieces start, is the base of the delivered counts."""
        d = self.daemon
        if not starting and not d.ready.is_set():
            return False
        try:
            dests = d.journal.destinations()
        except Exception:  # reloading
            return False
        snap = d.snapshot()
        active = {s.name for s in snap.destinations}
        self.samples.record(time.time(), {n: int(v.get("delivered") or 0) for n, v in dests.items() if n in active},
                            {s.name: s.queued for s in snap.destinations})
        return True

    def charts(self, span: str) -> dict[str, Any]:
        return self.samples.series(span, time.time())

    def failed(self) -> list[failures.FailedFile]:
        """The files in failed/ with their sidecars' words (walked at most once per CACHE seconds)."""
        return self._cached("failed", self._failed)

    def _failed(self) -> list[failures.FailedFile]:
        d = self.daemon
        found, totals = self._failed_files.list(list(d.spools))
        if d.tally is not None:
            for spool, n in zip(d.spools, totals):
                d.tally.failed_seen(spool, n)
        return found

    def history(self, params: Mapping[str, str]) -> list[Any]:
        """The history records matching the query string's filters (as `relaypacsd history`'s flags), newest
        first; UsageError naming the filter that is wrong."""
        from relaypacsd.commands.history import build_query

        args = argparse.Namespace(**{k: (params.get(k) or None) for k in HISTORY_FILTERS})
        try:
            args.limit = int(params.get("limit") or DEFAULT_HISTORY_LIMIT)
        except ValueError:
            raise UsageError(f"limit = {params.get('limit')!r}: use a number of records, or 0 for every match") from None
        args.limit = HISTORY_LIMIT if args.limit == 0 else min(args.limit, HISTORY_LIMIT)
        return self.daemon.journal.find_history(build_query(args, self.daemon.config, time.time()))

    def config(self) -> dict[str, Any]:
        """The effective config, secrets masked (as `config show` prints it)."""
        return {"source": self.daemon.config.source, "config": to_dict(self.daemon.config, mask=True)}

    # -- acting ------------------------------------------------------------------------------------

    def retry(self, ids: list[str] | None, user: str) -> dict[str, Any]:
        """Move failed files (by id, or all of them when `ids` is None) back to sending/, as `relaypacsd retry`."""
        d = self.daemon
        spools = list(d.spools)
        if ids is None:
            todo = [(spool, path) for spool in spools for path in spool.files("failed")]
            problems: list[dict[str, str]] = []
        else:
            todo, problems = [], []
            for file_id in ids:
                try:
                    todo.append(failures.locate(spools, file_id))
                except RequeueError as exc:
                    problems.append({"id": file_id, "error": str(exc)})
        queued = []
        for spool, path in todo:
            try:
                done = requeue(spool, d.journal, path, user=user)  # its history record names the operator
            except RequeueError as exc:
                problems.append({"id": self._id_of(spools, spool, path), "error": str(exc)})
                continue
            d.requeued(spool, done.new_path)
            queued.append({"id": self._id_of(spools, spool, path), "now": str(done.new_path),
                           "for": done.reset_dests, "warnings": done.warnings})
        if queued:
            logger.info("dashboard: {} put {} failed file(s) back into sending/: {}", user, len(queued),
                        ", ".join(q["id"] for q in queued[:20]) + (" ..." if len(queued) > 20 else ""))
        if d.tally is not None:
            d.tally.forget_failed()
        self._drop_cache()
        return {"queued": queued, "errors": problems}

    @staticmethod
    def _id_of(spools: list[Any], spool: Any, path: Path) -> str:
        return f"{spools.index(spool)}/{spool.relative(path).as_posix()}"

    def pause(self, name: str, paused: bool, user: str) -> dict[str, Any]:
        """Pause or resume one active PACS (the state file, then the engine at once); PauseError when it cannot."""
        d = self.daemon
        if name not in d.engine.destinations:
            active = ", ".join(d.engine.destinations) or "none"
            raise PauseError(f"no active PACS named {name!r} (active: {active})")
        pauses.set_paused(d.state_dir, name, paused, user, journal=d.journal)
        d.pauses.follow(d.engine.destinations)
        self._drop_cache()
        return {"name": name, "paused": paused, "by": user}


