"""relaypacsd.snapshot: one reading of the daemon's state, shared by metrics, STATUS line, heartbeat and `status`."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

import relaypacsd.metrics
from relaypacsd import __version__, cli
from relaypacsd.config import build_config
from relaypacsd.daemon import Daemon
from relaypacsd.metrics import Metrics
from relaypacsd.snapshot import folders_of, heartbeat_body, systemd_status, take
from relaypacsd.spool import Spool


class _QuietPacs:
    """A sender that answers the health probe and is never asked to store (no file is dropped)."""

    name = "pacs1"
    target = "http://127.0.0.1:1/dicom-web"

    def send(self, parts):
        raise AssertionError("no file was dropped")

    def probe(self) -> None:
        return None


def _engine(healthy: bool = True, in_flight: int = 0):
    dest = SimpleNamespace(name="pacs1", healthy=healthy, down_reason="" if healthy else "connection refused",
                           queued=lambda: 3, sender=SimpleNamespace(target="http://127.0.0.1:1/dicom-web"))
    return SimpleNamespace(destinations={"pacs1": dest}, in_flight=lambda: in_flight, backlog=lambda: 0)


def _daemon(tmp_path: Path) -> Daemon:
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state"), "metrics_port": 9},
                           "watch": [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}],
                           "pacs": {"pacs1": {"url": _QuietPacs.target}}}, {})
    return Daemon(config, senders={"pacs1": _QuietPacs()})


def test_metrics_never_imports_the_daemon():
    """The collector reads a snapshot: daemon -> metrics -> snapshot, no import back (not even for typing)."""
    tree = ast.parse(Path(relaypacsd.metrics.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "relaypacsd.daemon" not in imported and "relaypacsd.snapshot" in imported


def test_a_snapshot_holds_folders_destinations_and_run_counters(tmp_path):
    spool = Spool(tmp_path / "root")
    spool.prepare()
    (spool.inbox / "new.dcm").write_bytes(b"x")
    (spool.sent / "done.dcm").write_bytes(b"x")
    snap = take([spool], _engine(healthy=False, in_flight=2), {"sent": 4, "failed": 1}, True, lambda: True,
                time.monotonic() - 60, folders=True)
    assert (snap.in_flight, snap.sent, snap.failed, snap.alive, snap.version) == (2, 4, 1, True, __version__)
    assert 59 < snap.uptime_seconds < 70
    (dest,) = snap.destinations
    assert (dest.name, dest.healthy, dest.down_reason, dest.queued) == ("pacs1", False, "connection refused", 3)
    (root,) = snap.folders
    assert root.counts() == {"inbox": 1, "sending": 0, "sent": 1, "failed": 0} and root.oldest_waiting_seconds < 5
    doc = json.loads(json.dumps(snap.to_dict()))  # plain JSON for the dashboard
    assert doc["folders"][0] == {"root": str(spool.root), "inbox": 1, "sending": 0, "sent": 1, "failed": 0,
                                 "oldest_waiting_seconds": 0}
    assert doc["destinations"][0]["down_reason"] == "connection refused" and doc["roots"] == [str(spool.root)]


def test_without_folders_a_snapshot_walks_no_spool(tmp_path, monkeypatch):
    """The heartbeat and the STATUS line come every few seconds: a walk of sent/ each time would cost."""
    monkeypatch.setattr(Spool, "stats", lambda self: (_ for _ in ()).throw(AssertionError("walked")))
    snap = take([Spool(tmp_path / "root")], _engine(), {"sent": 0, "failed": 0}, True, lambda: True, 0.0)
    assert snap.folders == () and snap.roots == (str(tmp_path / "root"),)


def test_while_reloading_the_heartbeat_says_alive_and_the_metric_does_not():
    """Not ready (a reload rebuilds the pieces): `health` must not fail the daemon, the alive gauge is 0."""
    asked = []
    snap = take([], _engine(), {}, False, lambda: asked.append(1) or False, 0.0)
    assert not snap.alive and not asked  # the threads of a half-rebuilt generation are no verdict
    assert heartbeat_body(snap, 1, "h")["alive"] is True
    assert heartbeat_body(snap, 1, "h", stopped=True)["alive"] is False
    dead = take([], _engine(), {}, True, lambda: False, 0.0)
    assert heartbeat_body(dead, 1, "h")["alive"] is False


def test_status_line_heartbeat_and_metrics_of_a_daemon_read_one_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(Metrics, "start_server", lambda self, address, port: None)
    daemon = _daemon(tmp_path)
    daemon._start_metrics()
    walks = []
    real_stats = Spool.stats
    monkeypatch.setattr(Spool, "stats", lambda self: walks.append(self.root) or real_stats(self))
    daemon.start()
    try:
        (daemon.spools[0].failed / "x.dcm").write_bytes(b"x")  # failed/: no thread of the daemon moves it
        daemon.counters["failed"] = 2
        assert daemon.status_line() == systemd_status(daemon.snapshot()) == \
            "2 watch root(s); 0 file(s) in flight; 0 sent, 2 failed; PACS: pacs1 up"
        daemon._write_heartbeat()
        beat = json.loads((tmp_path / "state" / "heartbeat.json").read_text())
        assert set(beat) == {"time", "pid", "host", "alive", "stopped", "in_flight", "sent", "failed"}
        assert beat["alive"] and (beat["in_flight"], beat["sent"], beat["failed"]) == (0, 0, 2)
        assert walks == []  # neither walked a spool
        assert daemon.metrics is not None
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(daemon.metrics.render().decode()) for s in fam.samples}
        assert sorted(walks) == sorted(s.root for s in daemon.spools)  # a scrape: one walk per root
        assert samples[("relaypacsd_files_settled_total", (("folder", "failed"),))] == 2
        assert samples[("relaypacsd_files", (("folder", "failed"), ("root", str(daemon.spools[0].root))))] == 1
        assert samples[("relaypacsd_alive", ())] == 1
    finally:
        daemon.shutdown(timeout=5)


def test_status_json_counts_each_root_as_the_snapshot_does(tmp_path, capsys):
    """`status` runs in another process: its per-root part is the snapshot's folder record, same keys."""
    conf = tmp_path / "relaypacs.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[delivery]\nenabled = false\n'
                    f'[[watch]]\npath = "{tmp_path / "root"}"\n')
    spool = Spool(tmp_path / "root")
    spool.prepare()
    (spool.sending / "a.dcm").write_bytes(b"x")
    assert cli.main(["-c", str(conf), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["watch"] == [folders_of(spool).to_dict()]
    assert list(doc["watch"][0]) == ["root", "inbox", "sending", "sent", "failed", "oldest_waiting_seconds"]

