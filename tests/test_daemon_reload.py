"""A reload (SIGHUP) that changes what only a restart may change keeps the daemon running as it was."""

import dataclasses

from tests.dicomfactory import write_instance
from tests.helpers import ScriptedPacs, count, make_daemon, wait_until


def test_a_reload_to_another_or_unusable_state_dir_keeps_the_journal_where_it_is(tmp_path, monkeypatch):
    """Before, the pieces stopped and the new journal could not be opened: the daemon ended on a SIGHUP."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the new state_dir should be")
    moved = dataclasses.replace(daemon.config, daemon=dataclasses.replace(daemon.config.daemon,
                                                                          state_dir=str(blocked / "state")))
    monkeypatch.setattr("relaypacsd.reload.load_config", lambda source: moved)
    daemon.start()
    try:
        assert daemon.reload()
        assert daemon.state_dir == tmp_path / "state" and daemon.ready.is_set()
        write_instance(daemon.spools[0].inbox / "img.dcm")
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 1)  # still delivering, same journal
    finally:
        daemon.shutdown(timeout=5)
