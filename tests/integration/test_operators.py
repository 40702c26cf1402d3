"""What operators read: the real daemon's log and `relaypacsd status`, against the real Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relaypacsd.journal import open_journal
from tests.dicomfactory import write_instance, write_study
from tests.integration.daemon_helpers import (count_in, daemon_env, daemon_log, start_daemon, stop_daemon, wait_for,
                                              wait_ready, write_config)

FORGED = "INFO    | PACS forward orthanc delivered: 999 file(s)"


def _status(cfg: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "status", "--json"],
                         capture_output=True, text=True, env=daemon_env(), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_file_name_cannot_forge_a_log_line(tmp_path: Path, clean_orthanc, fmt: str) -> None:
    """Item 13: a name holding a newline and a fake record is logged escaped, in the text and JSON logs."""
    cfg = write_config(tmp_path, clean_orthanc, daemon={"log_format": fmt})
    name = f"x\n{FORGED}\r\x1b[2J.dcm"
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        write_instance(tmp_path / name)
        (tmp_path / name).rename(tmp_path / "spool" / "inbox" / name)
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == 1, 30, message=lambda: daemon_log(proc)[-3000:])
    finally:
        assert stop_daemon(proc) == 0
    for text in (daemon_log(proc), (tmp_path / "logs" / "relaypacsd.log").read_text()):
        lines = text.splitlines()
        assert not any(line.startswith(FORGED.split(" ")[0]) for line in lines), text
        assert not any("\x1b" in line or "\r" in line for line in lines)
        if fmt == "json":
            records = [json.loads(line)["record"] for line in lines if line.startswith("{")]
            named = [r["message"] for r in records if "PACS forward" in r["message"] and "x\\n" in r["message"]]
            assert named and not any("\n" in r["message"] for r in records)
        else:
            assert any("files=x\\nINFO    | PACS forward orthanc delivered: 999 file(s)\\r\\x1b[2J.dcm" in line
                       for line in lines), text


def test_status_tells_the_truth_from_the_first_delivery(tmp_path: Path, clean_orthanc) -> None:
    """Item 10: after files were delivered to a healthy Orthanc, status said `health unknown`, `last success
    never`, `delivered 0`; an earlier run's DOWN stayed on show while the PACS was up."""
    cfg = write_config(tmp_path, clean_orthanc)
    journal = open_journal(tmp_path / "state")
    journal.set_health("orthanc", False, "PACS 'orthanc' unreachable at ...: connection refused")  # an earlier run
    journal.close()
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        assert _status(cfg)["pacs"][0]["health"] != "DOWN"  # at once: the earlier run's finding is not this run's
        n = 7
        _, sops = write_study(tmp_path / "staging", n)
        for f in sorted((tmp_path / "staging").iterdir()):
            f.rename(tmp_path / "spool" / "inbox" / f.name)
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == n, 30, message=lambda: daemon_log(proc)[-3000:])
        pacs = wait_for(lambda: (lambda p: p if p["delivered"] == n else None)(_status(cfg)["pacs"][0]), 10)
        assert pacs["health"] == "up" and pacs["health_current"] is True
        assert pacs["last_success"] is not None and pacs["last_success_age_seconds"] < 60
        assert pacs["failed"] == 0 and pacs["waiting"] == 0
        assert set(sops) <= clean_orthanc.list_instance_uids()
    finally:
        assert stop_daemon(proc) == 0
    after = _status(cfg)["pacs"][0]
    assert after["health"] == "up" and after["health_current"] is False and after["delivered"] == n


def test_a_store_only_account_gets_its_files_and_is_shown_up(tmp_path: Path, orthanc_factory) -> None:
    """Item 11 through the real daemon: an account that may store but not query (QIDO 403) was DOWN for ever."""
    from tests.integration.pacs_helpers import STORE_ONLY_FILTER

    lua = tmp_path / "store-only.lua"
    lua.write_text(STORE_ONLY_FILTER)
    server = orthanc_factory(extra={"LuaScripts": [str(lua)], "RegisteredUsers": {"storeonly": "st0re-pw"}})
    cfg = write_config(tmp_path, server, pacs={"username": "storeonly", "password": "st0re-pw"})
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        wait_for(lambda: _status(cfg)["pacs"][0]["health"] != "unknown", 10)  # the first probe has run
        _, sops = write_study(tmp_path / "staging", 3)
        for f in sorted((tmp_path / "staging").iterdir()):
            f.rename(tmp_path / "spool" / "inbox" / f.name)
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == 3, 20, message=lambda: daemon_log(proc)[-3000:])
        assert _status(cfg)["pacs"][0]["health"] == "up"
    finally:
        assert stop_daemon(proc) == 0
    assert set(sops) <= server.list_instance_uids()
    assert "is DOWN" not in daemon_log(proc)
