"""A network share for real: a FUSE view (bindfs) where writes by "another host" raise no inotify event."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from relaypacsd.watcher import choose_observer, filesystem_type
from tests.dicomfactory import write_study
from tests.integration.pipeline_helpers import make_config, pacs_table, running, wait_for


@pytest.fixture
def share(tmp_path):
    """(backing dir, FUSE view): files written into the backing dir appear in the view without events."""
    if not shutil.which("bindfs") or not os.path.exists("/dev/fuse"):
        if os.environ.get("CI") == "true":
            pytest.fail("bindfs/FUSE missing: apt-get install -y bindfs fuse3", pytrace=False)
        pytest.skip("bindfs/FUSE missing")
    real, view = tmp_path / "real", tmp_path / "view"
    real.mkdir()
    view.mkdir()
    subprocess.run(["bindfs", "--no-allow-other", str(real), str(view)], check=True, timeout=30)
    try:
        assert wait_for(lambda: filesystem_type(view).startswith("fuse"), timeout=10)
        yield real, view
    finally:
        subprocess.run(["fusermount", "-u", str(view)], timeout=30, check=False)
        if os.path.ismount(view):
            subprocess.run(["umount", "-l", str(view)], timeout=30, check=False)


def _config(tmp_path, view, orthanc, **watch):
    config = make_config(tmp_path, {"orthanc": pacs_table(orthanc)}, watch=watch)
    # The watch root lives on the share; the state dir stays local.
    from dataclasses import replace

    return replace(config, watch=(replace(config.watch[0], path=str(view / "spool")),))


def test_auto_chooses_polling_on_a_share_and_delivers_files_written_by_another_host(tmp_path, share, clean_orthanc):
    real, view = share
    assert choose_observer(view, "auto") == "polling"
    config = _config(tmp_path, view, clean_orthanc, observer="auto", rescan_interval=3600)
    with running(config) as daemon:
        assert daemon.watchers[0].mode == "polling"
        study, sops = write_study(real / "spool" / "inbox" / "ct", 5)  # written on the "server side"
        assert wait_for(lambda: len(list((real / "spool" / "sent").rglob("*.dcm"))) == 5, timeout=30)
    assert clean_orthanc.list_instance_uids() == set(sops)


def test_native_events_see_nothing_there(tmp_path, share, clean_orthanc):
    """The control: it is polling, not a rescan or luck, that finds the files above."""
    real, view = share
    config = _config(tmp_path, view, clean_orthanc, observer="native", rescan_interval=3600)
    with running(config) as daemon:
        assert wait_for(lambda: daemon.watchers[0]._next_rescan > 0, timeout=10)  # past the initial scan
        write_study(real / "spool" / "inbox", 3)
        time.sleep(3)
        assert len(list((real / "spool" / "inbox").glob("*.dcm"))) == 3
        assert daemon.watchers[0].mode == "native"
    assert clean_orthanc.count_instances() == 0
