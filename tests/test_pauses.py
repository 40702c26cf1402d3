"""Pausing a PACS: the state file, and a paused queue that takes no batch and lets nothing expire."""

from __future__ import annotations

import threading
import time

import pytest

from relaypacsd.errors import PauseError
from relaypacsd.pauses import read_paused, set_paused
from tests.dicomfactory import write_instance
from tests.helpers import ScriptedPacs, count, make_daemon, wait_until


def test_a_pause_is_kept_in_the_state_dir_and_refused_twice(tmp_path):
    set_paused(tmp_path, "orthanc", True, "olga")
    assert read_paused(tmp_path)["orthanc"]["by"] == "olga"
    with pytest.raises(PauseError, match="already paused.*olga"):
        set_paused(tmp_path, "orthanc", True, "vic")
    set_paused(tmp_path, "orthanc", False, "vic")
    assert read_paused(tmp_path) == {}
    with pytest.raises(PauseError, match="not paused"):
        set_paused(tmp_path, "orthanc", False, "vic")


def test_a_paused_pacs_gets_nothing_until_resumed_and_survives_a_restart(tmp_path):
    pacs = ScriptedPacs("orthanc")
    set_paused(tmp_path / "state", "orthanc", True, "olga")  # from an earlier run
    daemon = make_daemon(tmp_path, pacs)
    daemon.start()
    try:
        assert daemon.engine.destinations["orthanc"].paused
        write_instance(tmp_path / "x.dcm")
        (tmp_path / "x.dcm").rename(daemon.spools[0].inbox / "x.dcm")
        assert wait_until(lambda: count(daemon.spools[0], "sending") == 1, 5)
        time.sleep(0.5)
        daemon.engine.sweep()
        assert not pacs.calls and daemon.snapshot().destinations[0].paused_by == "olga"
        set_paused(tmp_path / "state", "orthanc", False, "vic")  # as `relaypacsd resume` in another shell
        daemon._heartbeat_job()
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 1, 10)
    finally:
        daemon.shutdown()


def test_while_paused_no_file_expires(tmp_path):
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    dest = daemon.engine.destinations["orthanc"]
    dest.set_paused(True, "olga")
    item = object()
    dest.waiting[item] = 0.0  # type: ignore[index]
    assert dest.take_expired(time.monotonic() + 10**9, 1.0) == []
    daemon.journal.close()




def _fake_item(tmp_path):
    from relaypacsd.dicomfile import inspect
    from relaypacsd.queues import Item
    from relaypacsd.spool import Spool

    path = tmp_path / "a.dcm"
    write_instance(path)
    return Item(path=path, spool=Spool(tmp_path), info=inspect(path), born=time.monotonic(), pending={"orthanc"})


def test_take_batch_blocks_while_paused(tmp_path):
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    dest = daemon.engine.destinations["orthanc"]
    dest.set_paused(True, "olga")
    dest.put(_fake_item(tmp_path))
    stop, got = threading.Event(), []
    worker = threading.Thread(target=lambda: got.append(dest.take_batch(stop)))
    worker.start()
    time.sleep(0.3)
    assert not got
    dest.set_paused(False)
    worker.join(5)
    assert got and len(got[0]) == 1
    daemon.journal.close()
