"""A generation's pieces and the hand-over between generations at a reload."""

from __future__ import annotations

from tests.dicomfactory import write_instance
from tests.helpers import ScriptedPacs, make_daemon


def test_what_an_old_generation_hands_on_after_a_reload_goes_to_the_new_one(tmp_path):
    """A validation (or unpack) that outlived a reload's wait queues a file, or marks a folder emptied: the new
    generation must take it. Handed to the stopped generation's intake, the file waited for the next sweep's
    scan of sending/, and the folder stayed until the next restart."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    daemon.start()
    try:
        old = daemon.pieces
        daemon._stop_pieces(timeout=5)  # what reload() does
        daemon._build(daemon.config)
        path = spool.sending / "late.dcm"
        write_instance(path)
        old.queue_intake(spool, path)  # the old generation's validation asks for it to be validated again
        old.may_be_empty(spool, spool.sending / "study")
        assert path in daemon.intake.pending_paths()
        assert daemon.folders is not old.folders and daemon.folders.marked(spool, spool.sending / "study")
    finally:
        daemon._stop_pieces(timeout=5)
