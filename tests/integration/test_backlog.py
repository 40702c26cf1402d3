"""A backlog larger than the active window, with a real Orthanc away and back (#14 item 7)."""

from __future__ import annotations

import threading
import time

from relaypacsd.localorthanc import LocalOrthanc
from tests.dicomfactory import write_study
from tests.integration.pipeline_helpers import captured_log, files, make_config, pacs_table, running, wait_for

WINDOW = 10


def test_more_files_than_the_window_wait_through_an_outage_and_a_restart_and_each_arrives_once(tmp_path,
                                                                                               orthanc_factory):
    """60 files, a window of 10: the PACS is away while they arrive, the daemon restarts with 50 of them in the
    backlog, the PACS comes back; every file reaches it exactly once and the window never held more than 10."""
    pacs = orthanc_factory()
    ports, auth = (pacs.http_port, pacs.dicom_port), (pacs.username, pacs.password)
    config = make_config(tmp_path, {"orthanc": pacs_table(pacs)}, active_window=WINDOW, batch_max_instances=4)
    pacs.stop(timeout=0)  # away
    sending = str(tmp_path / "spool" / "sending")
    peak = {"held": 0}
    stop = threading.Event()

    def sample(daemon) -> None:
        while not stop.wait(0.005):
            peak["held"] = max(peak["held"], daemon.engine.window.held())

    with captured_log() as log:
        with running(config) as daemon:
            study, sops = write_study(tmp_path / "spool" / "inbox", 60)
            assert wait_for(lambda: len(daemon.journal.paths_under(sending)) == 60, timeout=60)
            assert daemon.engine.window.held() == WINDOW
            assert daemon.journal.backlog_counts(["orthanc"]) == {"orthanc": 50}
        # A restart: the 50 are taken from the journal, the 10 the last run held are found untracked in sending/.
        with running(config) as daemon:
            sampler = threading.Thread(target=sample, args=(daemon,), daemon=True)
            sampler.start()
            assert wait_for(lambda: daemon.journal.backlog_counts(["orthanc"])["orthanc"] == 50
                            and daemon.engine.window.held() == WINDOW, timeout=30)
            back = LocalOrthanc(pacs.workdir, http_port=ports[0], dicom_port=ports[1], username=auth[0],
                                password=auth[1]).start()
            try:
                assert wait_for(lambda: len(files(tmp_path, "sent")) == 60, timeout=90)
                stored = back.list_instance_uids()
            finally:
                stop.set()
                back.stop(timeout=0)
            sampler.join(2)
    assert stored == set(sops)
    sent = [u for line in log if "PACS forward orthanc delivered" in line or "PACS forward orthanc duplicate" in line
            for u in line.split("uids=")[1].split(",")]
    assert sorted(sent) == sorted(sops)  # each file exactly once: none sent again (a duplicate), none missing
    assert files(tmp_path, "sending") == [] and files(tmp_path, "failed") == []
    assert 0 < peak["held"] <= WINDOW


PG_FILES, PG_WINDOW = 3000, 300


def test_a_backlog_in_the_postgresql_journal_drains_within_seconds_and_each_file_arrives_once(tmp_path, orthanc_factory,
                                                                                            clean_postgres):
    """The shared journal's backlog (#14 item 7 on PostgreSQL): 3,000 files claimed from the inbox while the PACS
    is away, a window of 300 (the other 2,700 wait with their rows, owned by this node); the PACS comes back: the
    first file is in sent/ within seconds, every file reaches it exactly once, the window never held more."""
    pacs = orthanc_factory()
    ports, auth = (pacs.http_port, pacs.dicom_port), (pacs.username, pacs.password)
    config = make_config(tmp_path, {"orthanc": pacs_table(pacs)}, journal={"url": clean_postgres.url},
                         active_window=PG_WINDOW, batch_max_instances=20)
    pacs.stop(timeout=0)  # away
    sending = str(tmp_path / "spool" / "sending")
    peak = {"held": 0}
    stop = threading.Event()

    def sample(daemon) -> None:
        while not stop.wait(0.005):
            peak["held"] = max(peak["held"], daemon.engine.window.held())

    with captured_log() as log:
        with running(config) as daemon:
            sampler = threading.Thread(target=sample, args=(daemon,), daemon=True)
            sampler.start()
            study, sops = write_study(tmp_path / "spool" / "inbox", PG_FILES)
            assert wait_for(lambda: len(daemon.journal.paths_under(sending)) == PG_FILES, timeout=120)
            assert wait_for(lambda: daemon.engine.window.held() == PG_WINDOW
                            and daemon.journal.backlog_counts(["orthanc"]) == {"orthanc": PG_FILES - PG_WINDOW},
                            timeout=30)
            back = LocalOrthanc(pacs.workdir, http_port=ports[0], dicom_port=ports[1], username=auth[0],
                                password=auth[1]).start()
            returned = time.monotonic()
            try:
                assert wait_for(lambda: len(files(tmp_path, "sent")) > 0, timeout=30)
                first = time.monotonic() - returned
                assert wait_for(lambda: len(files(tmp_path, "sent")) == PG_FILES, timeout=180)
                stored = back.list_instance_uids()
            finally:
                stop.set()
                back.stop(timeout=0)
            sampler.join(2)
    # The health probe runs every second here (health_interval): then the window's files go at once.
    assert first < 10, f"the first file reached sent/ {first:.1f} s after the PACS came back"
    assert stored == set(sops)
    sent = [u for line in log if "PACS forward orthanc delivered" in line or "PACS forward orthanc duplicate" in line
            for u in line.split("uids=")[1].split(",")]
    assert sorted(sent) == sorted(sops)  # each file exactly once
    assert files(tmp_path, "sending") == [] and files(tmp_path, "failed") == []
    assert 0 < peak["held"] <= PG_WINDOW
