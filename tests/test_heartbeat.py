"""The heartbeat file: one name, one reader for `status` and `health`."""

import json

from relaypacsd.heartbeat import HEARTBEAT_FILE, heartbeat_path, read_heartbeat


def test_the_heartbeat_lives_in_state_dir_under_its_documented_name(tmp_path):
    assert HEARTBEAT_FILE == "heartbeat.json" and heartbeat_path(str(tmp_path)) == tmp_path / "heartbeat.json"


def test_read_heartbeat_gives_the_body_or_none_when_missing_or_unreadable(tmp_path):
    assert read_heartbeat(tmp_path) is None
    (tmp_path / HEARTBEAT_FILE).write_text('{"time": 1')  # cut short by a full disk
    assert read_heartbeat(tmp_path) is None
    (tmp_path / HEARTBEAT_FILE).write_text("[1, 2]")
    assert read_heartbeat(tmp_path) is None
    (tmp_path / HEARTBEAT_FILE).write_text(json.dumps({"time": 5.0, "pid": 7}))
    assert read_heartbeat(tmp_path) == {"time": 5.0, "pid": 7}
