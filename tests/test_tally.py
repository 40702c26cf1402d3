"""Kept folder counts: sent/ walked once then kept by the daemon's moves; failed/ walked, briefly cached."""

from __future__ import annotations

import threading

from relaypacsd import tally as tally_module
from relaypacsd.spool import Spool
from relaypacsd.tally import Tally, count_files
from tests.dicomfactory import write_instance
from tests.helpers import ScriptedPacs, count, make_daemon, wait_until


def test_count_files_counts_as_the_spool_lists_without_sidecars_or_temp_files(tmp_path):
    spool = Spool(tmp_path)
    spool.prepare()
    for rel in ("a.dcm", "x/b.dcm", "x/y/c.dcm", "d.dcm.error.json", ".relaypacs-sidecar.1.tmp"):
        (spool.failed / rel).parent.mkdir(parents=True, exist_ok=True)
        (spool.failed / rel).write_text("x")
    assert count_files(spool.failed) == len(list(spool.files("failed"))) == 3


def test_sent_is_walked_once_then_kept_and_failed_is_cached_briefly(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    spool.prepare()
    for i in range(5):
        (spool.sent / f"{i}.dcm").write_text("x")
    t = Tally()
    assert t.sent(spool.root) is None
    t.count([spool], threading.Event())
    t.join()
    assert t.sent(spool.root) == 5
    (spool.sent / "by-hand.dcm").write_text("x")  # not the daemon's move: seen at the next walk only
    t.moved_to_sent(spool.root)
    t.moved_to_sent(spool.root, -2)
    assert t.sent(spool.root) == 4
    (spool.failed / "f.dcm").write_text("x")
    assert t.failed(spool) == 1
    (spool.failed / "g.dcm").write_text("x")
    assert t.failed(spool) == 1  # cached
    monkeypatch.setattr(tally_module, "FAILED_TTL", 0.0)
    assert t.failed(spool) == 2


def test_the_daemons_kept_counts_match_its_folders_without_walking_sent(tmp_path, monkeypatch):
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    daemon.tally = Tally()
    daemon.start()
    try:
        spool = daemon.spools[0]
        for i in range(4):
            write_instance(tmp_path / f"s{i}.dcm")
            (tmp_path / f"s{i}.dcm").rename(spool.inbox / f"s{i}.dcm")
        assert wait_until(lambda: count(spool, "sent") == 4, 10)
        # The engine lets go of a file just after its move to sent/: until then it counts as sending.
        assert wait_until(lambda: daemon.engine.in_flight() == 0 and daemon.tally.sent(spool.root) == 4, 10)
        walks = []
        real = tally_module.count_files
        monkeypatch.setattr(tally_module, "count_files", lambda folder, stop=None: walks.append(folder) or real(folder, stop))
        folders = daemon.snapshot(kept=True).folders[0]
        assert (folders.inbox, folders.sending, folders.sent, folders.failed) == (0, 0, 4, 0)
        assert spool.sent not in walks
    finally:
        daemon.shutdown()
        daemon.tally.join()
