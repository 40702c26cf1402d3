"""Issue #9 item 3 against the real Orthanc: a file rewritten or deleted in sending/ after its validation,
through the in-process daemon and the real STOW-RS sender."""

from __future__ import annotations

import os
from pathlib import Path

from relaypacsd.config import build_config
from relaypacsd.daemon import Daemon
from relaypacsd.errors import PacsUnreachable
from relaypacsd.senders import build_sender
from tests.dicomfactory import MR_SMALL, write_instance
from tests.helpers import count, wait_until
from tests.integration.pacs_helpers import cstore_pacs, pacs_for


def _held_daemon(tmp_path, orthanc):
    """The daemon with the real sender, whose probe fails until released: validated files wait unsent."""
    sender = build_sender(pacs_for(orthanc))
    real_probe, down = sender.probe, [True]

    def probe():
        if down[0]:
            raise PacsUnreachable("PACS 'orthanc' held down by the test")
        real_probe()

    sender.probe = probe
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           "watch": [{"path": str(tmp_path / "root"), "settle_seconds": 0.1, "rescan_interval": 3600}],
                           "delivery": {"retry_delay": 0.01}, "pacs": {"orthanc": {"url": orthanc.url}}}, {})
    daemon = Daemon(config, senders={"orthanc": sender})
    return daemon, down


def test_rewritten_in_sending_is_validated_again_and_the_new_version_reaches_orthanc(tmp_path, clean_orthanc):
    daemon, down = _held_daemon(tmp_path, clean_orthanc)
    spool, dest = daemon.spools[0], daemon.engine.destinations["orthanc"]
    daemon.start()
    try:
        assert wait_until(lambda: not dest.healthy)
        old_sop = write_instance(spool.inbox / "img.dcm")
        gone_sop = write_instance(spool.inbox / "gone.dcm")
        assert wait_until(lambda: daemon.engine.known(spool.sending / "img.dcm")
                          and daemon.engine.known(spool.sending / "gone.dcm"))
        new_sop = write_instance(spool.sending / "img.dcm", MR_SMALL)  # another size
        (spool.sending / "gone.dcm").unlink()
        down[0] = False
        daemon.engine.probe()
        assert wait_until(lambda: count(spool, "sent") == 1 and daemon.engine.in_flight() == 0, timeout=20)
    finally:
        daemon.shutdown(timeout=10)
    assert clean_orthanc.list_instance_uids() == {new_sop}
    assert old_sop != new_sop and gone_sop not in clean_orthanc.list_instance_uids()
    assert count(spool, "sending") == 0 and count(spool, "failed") == 0


def test_cstore_sends_nothing_of_a_file_rewritten_since_validation(clean_orthanc, tmp_path):
    """C-STORE reads the file itself: a rewritten one would go out unvalidated, under the old one's name."""
    from relaypacsd.cstore import CStoreSender
    from relaypacsd.delivery import Changed, deliver_parts
    from relaypacsd.models import Part

    keep, changed, gone = (tmp_path / n for n in ("keep.dcm", "changed.dcm", "gone.dcm"))
    parts = [Part(p, write_instance(p), p.stat().st_size) for p in (keep, changed, gone)]
    write_instance(changed, MR_SMALL)
    gone.unlink()
    final = deliver_parts(CStoreSender(cstore_pacs(clean_orthanc)), parts, attempts=3, delay=0, sleep=lambda s: None)
    assert final[parts[0]].outcome.delivered
    assert isinstance(final[parts[1]], Changed) and not final[parts[1]].gone
    assert isinstance(final[parts[2]], Changed) and final[parts[2]].gone
    assert clean_orthanc.list_instance_uids() == {parts[0].sop_uid}  # neither the new version nor the old


def test_a_file_deleted_during_a_stow_request_is_the_files_problem_not_the_pacs(clean_orthanc, tmp_path,
                                                                                 monkeypatch):
    """Gone between the check before the request and the reading of its part: the PACS stays up."""
    from relaypacsd.delivery import Changed, send_safely
    from relaypacsd.models import Part

    keep, gone = tmp_path / "keep.dcm", tmp_path / "gone.dcm"
    parts = [Part(p, write_instance(p), p.stat().st_size) for p in (keep, gone)]
    sender = build_sender(pacs_for(clean_orthanc))
    real_stat = Path.stat

    def stat_then_delete(self, *args, **kwargs):  # the check before the request passes, then the file goes
        result = real_stat(self, *args, **kwargs)
        if self == gone and os.path.exists(gone):
            os.unlink(gone)
        return result

    monkeypatch.setattr(Path, "stat", stat_then_delete)
    results, _, down = send_safely(sender, parts)
    assert down is None and isinstance(results[1], Changed) and results[1].gone
    assert not isinstance(results[0], Changed)  # not sent: the request was cut; it waits as transient
