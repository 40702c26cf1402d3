"""A backlog larger than the active window, with a real Orthanc away and back (#14 item 7)."""

from __future__ import annotations

import threading

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
