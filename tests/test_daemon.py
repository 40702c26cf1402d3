"""The daemon object: start-up recovery and its hand-offs between watcher, validation and the engine."""

import shutil
import time

from relaypacsd.config import build_config
from relaypacsd.daemon import Daemon
from relaypacsd.dicomfile import inspect
from relaypacsd.journal import Update
from tests.dicomfactory import write_instance
from tests.test_delivery import ScriptedPacs, count, wait_until


def make(tmp_path, pacs):
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           "watch": [{"path": str(tmp_path / "root"), "settle_seconds": 0.1}],
                           "delivery": {"retry_delay": 0.01},
                           "pacs": {pacs.name: {"url": pacs.target}}}, {})
    return Daemon(config, senders={pacs.name: pacs})


def test_start_forgets_rows_of_files_a_killed_run_moved_but_did_not_record(tmp_path):
    """Killed between moving a file to sent/ and forgetting it, a run leaves "delivered" rows behind:
    the next file of that name, even the same instance sent again, must really be sent."""
    pacs = ScriptedPacs("orthanc")
    daemon = make(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    sop = write_instance(tmp_path / "img.dcm")
    old = spool.sending / "img.dcm"  # what the killed run had moved on to sent/
    daemon.journal.ensure(str(old), ["orthanc"], sop=sop)
    daemon.journal.apply([Update(str(old), "orthanc", "delivered", "delivered")])
    keep = spool.sending / "keep.dcm"
    shutil.copy(tmp_path / "img.dcm", keep)
    daemon.journal.ensure(str(keep), ["orthanc"], sop=sop)
    daemon.start()
    try:
        assert daemon.journal.rows(str(old)) == {}
        shutil.copy(tmp_path / "img.dcm", spool.inbox / "img.dcm")
        assert wait_until(lambda: count(spool, "sent") == 2)
    finally:
        daemon.shutdown(timeout=5)
    assert pacs.received(sop) == 2  # keep.dcm (its rows were kept: the file exists) and the new img.dcm


def test_a_file_of_the_same_name_claimed_while_the_last_one_was_moved_out_is_taken_at_once(tmp_path):
    """Validation skips a path the engine still tracks; the engine's hand-back must pick it up."""
    pacs = ScriptedPacs("orthanc")
    daemon = make(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    write_instance(spool.sending / "img.dcm")
    path = spool.sending / "img.dcm"
    daemon.engine.submit(path, spool, inspect(path))  # tracked, not started: nothing is sent
    daemon._validate(spool, path)  # the new file under the same name: skipped as known
    assert daemon._intake.qsize() == 0
    (item,) = daemon.engine._items.values()
    daemon.engine._items.clear()
    daemon._on_finished(item, "sent")  # the old one has left; a file still stands at that path
    assert daemon._intake.qsize() == 1 and daemon.counters["sent"] == 1
    daemon.journal.close()


def test_reload_waits_for_the_request_in_flight(tmp_path, monkeypatch):
    """reload() stops the engine without a deadline: a new engine must never run beside an old request."""
    pacs = ScriptedPacs("orthanc")
    daemon = make(tmp_path, pacs)
    seen = []
    real_stop = daemon.engine.stop
    monkeypatch.setattr(daemon.engine, "stop",
                        lambda timeout=30.0, give_up=lambda: False: seen.append(timeout) or real_stop(timeout, give_up))
    monkeypatch.setattr("relaypacsd.daemon.load_config", lambda source: daemon.config)
    daemon.start()
    try:
        time.sleep(0.1)
        assert daemon.reload() is True
    finally:
        daemon.shutdown(timeout=5)
    assert seen[0] is None
