"""Helpers the unit tests share: a scripted PACS, a daemon around it, waiting and counting, an old journal."""

from __future__ import annotations

import threading
import time

from relaypacsd.config import build_config
from relaypacsd.daemon import Daemon
from relaypacsd.delivery import Engine
from relaypacsd.dicomfile import inspect
from relaypacsd.journal import open_journal
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.spool import Spool
from tests.dicomfactory import write_study


class ScriptedPacs:
    """A Sender whose answer per instance comes from `rule(uid, batch_size, call_number)`."""

    def __init__(self, name, rule=None):
        self.name, self.target = name, f"http://{name}.test/dicom-web"
        self.rule = rule or (lambda uid, n, call: Outcome.DELIVERED)
        self.calls: list[list[str]] = []
        self.raise_next: list[Exception] = []
        self.probe_error: Exception | None = None
        self.lock = threading.Lock()

    def send(self, parts):
        with self.lock:
            uids = [p.sop_uid for p in parts]
            self.calls.append(uids)
            call = len(self.calls)
            if self.raise_next:
                raise self.raise_next.pop(0)
        results = []
        for uid in uids:
            outcome = self.rule(uid, len(uids), call)
            code = 0xA900 if outcome is Outcome.PERMANENT else None
            results.append(InstanceResult(uid, outcome, 200, code, f"scripted {outcome.value}"))
        return results, 200

    def probe(self):
        if self.probe_error:
            raise self.probe_error

    def received(self, uid):
        return sum(call.count(uid) for call in self.calls)


def wait_until(pred, timeout=10):
    """True once `pred()` is, polling for up to `timeout` seconds; else what it last said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def count(spool, folder):
    """How many files are in one of the spool's folders."""
    return len(list(spool.files(folder)))


def gated(pacs):
    """Hold every request to `pacs` until the returned event is set (a slow PACS, an answer in flight)."""
    gate, send = threading.Event(), pacs.send
    pacs.send = lambda parts: (gate.wait(10), send(parts))[1]
    return gate


def engine_setup(tmp_path, senders, n=4, **delivery):
    """An Engine (not started) for `senders` (ScriptedPacs), its spool with `n` instances of one study in
    inbox/, and their SOP Instance UIDs."""
    delivery = {"retry_delay": 0.01, "retry_attempts": 3, "workers_per_pacs": 1, **delivery}
    config = build_config({"watch": [{"path": str(tmp_path / "root")}], "delivery": delivery,
                           "pacs": {s.name: {"url": s.target} for s in senders}}, {})
    spool = Spool(tmp_path / "root")
    spool.prepare()
    study, sops = write_study(spool.inbox, n)
    journal = open_journal(tmp_path / "state")
    engine = Engine(config, journal, {s.name: s for s in senders})
    return engine, spool, sops


def submit_all(engine, spool):
    """Claim every file in inbox/ and hand it to the engine, validated."""
    for f in list(spool.files("inbox")):
        claimed = spool.claim(f)
        engine.submit(claimed, spool, inspect(claimed))


def make_daemon(tmp_path, pacs):
    """A Daemon in tmp_path whose only PACS is `pacs` (a ScriptedPacs), before start()."""
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           # the rescan is an hour away: what a test sees comes from inotify and the sweep
                           "watch": [{"path": str(tmp_path / "root"), "settle_seconds": 0.1,
                                      "rescan_interval": 3600}],
                           "delivery": {"retry_delay": 0.01},
                           "pacs": {pacs.name: {"url": pacs.target}}}, {})
    return Daemon(config, senders={pacs.name: pacs})


# The schema of journals written before the instances table and the token/conflicts columns existed.
OLD_SCHEMA = """
CREATE TABLE deliveries (path TEXT NOT NULL, dest TEXT NOT NULL, sop TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, first_seen REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '', last_code INTEGER, updated REAL NOT NULL, PRIMARY KEY (path, dest));
CREATE TABLE history (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, dest TEXT NOT NULL, time REAL NOT NULL,
    event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX history_path ON history(path);
CREATE TABLE destinations (dest TEXT PRIMARY KEY, healthy INTEGER NOT NULL, last_error TEXT NOT NULL DEFAULT '',
    last_change REAL NOT NULL, last_success REAL, delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0);
"""


def refuse_sidecar_removal(monkeypatch) -> None:
    """Make every `.error.json` impossible to delete (EPERM), as on a folder the service user may not write."""
    from pathlib import Path

    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name.endswith(".error.json"):
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
