"""The real daemon under a wall clock that steps (libfaketime): ages and scheduled jobs must not follow it.

libfaketime (Debian's `faketime`) fakes CLOCK_REALTIME only (FAKETIME_DONT_FAKE_MONOTONIC=1) and rereads
the offset from a file at every call (FAKETIME_NO_CACHE=1), so the test steps the daemon's clock at
runtime as NTP or a resumed VM would. (Its clock_nanosleep is broken with the monotonic clock left alone:
Python's time.sleep fails with EINVAL under it; the daemon waits on events and conditions only.)
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import pytest

from relaypacsd.localorthanc import LocalOrthanc
from tests.dicomfactory import write_instance
from tests.integration.daemon_helpers import (daemon_log, files_in, start_daemon, stop_daemon, wait_for, wait_ready,
                                              write_config)

_LIBS = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"))


def faketime_env(offset_file: Path) -> dict[str, str]:
    """Environment that runs a process under libfaketime with the offset read from `offset_file`."""
    if not _LIBS:
        message = "libfaketime not installed (apt-get install faketime)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    offset_file.write_text("+0\n")
    # Read the offset at most once a second, not at every clock call: with FAKETIME_NO_CACHE each time() opened
    # and read the file, and a daemon that asks the time often (history, nodes, logs) slowed until its jobs
    # overran their 1 s intervals and the test's waits ran out (seen in CI). A step lands within a second.
    return {"LD_PRELOAD": _LIBS[0], "FAKETIME_TIMESTAMP_FILE": str(offset_file), "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def step(offset_file: Path, seconds: int) -> None:
    """Set the daemon's wall clock `seconds` away from the real one (atomically: it is read at every call)."""
    tmp = offset_file.with_name(offset_file.name + ".tmp")
    tmp.write_text(f"{seconds:+d}\n")
    os.replace(tmp, offset_file)


def heartbeat_time(tmp_path: Path) -> float:
    try:
        return float(json.loads((tmp_path / "state" / "heartbeat.json").read_text())["time"])
    except (OSError, ValueError, KeyError):
        return 0.0


def journal_rows(tmp_path: Path) -> int:
    """How many delivery rows the daemon's journal holds (read-only, beside the running daemon)."""
    from relaypacsd.journal import open_journal

    try:
        journal = open_journal(tmp_path / "state", readonly=True)
    except Exception:  # not created yet
        return 0
    try:
        return sum(sum(states.values()) for states in journal.counts().values())
    finally:
        journal.close()


def restart(server: LocalOrthanc) -> LocalOrthanc:
    """The same PACS back on its ports, with its data."""
    return LocalOrthanc(server.workdir, http_port=server.http_port, dicom_port=server.dicom_port,
                        username=server.username, password=server.password).start()


def test_a_clock_step_forward_fails_no_file_that_waited_seconds(tmp_path, orthanc_factory):
    """Two hours on, with max_age_hours = 1: the file waiting for a PACS that is down has waited seconds."""
    offset = tmp_path / "faketime-offset"
    env = faketime_env(offset)
    pacs = orthanc_factory()
    cfg = write_config(tmp_path, pacs, delivery={"max_age_hours": 1.0})
    pacs.stop(timeout=0)
    proc = start_daemon(cfg, env)
    back = None
    try:
        wait_ready(proc)
        wait_for(lambda: "is DOWN" in daemon_log(proc), message=lambda: daemon_log(proc)[-2000:])
        sop = write_instance(tmp_path / "spool" / "inbox" / "img.dcm")
        wait_for(lambda: files_in(tmp_path / "spool", "sending"), message=lambda: daemon_log(proc)[-2000:])
        # Validated and queued before the step (a loaded machine may validate it later): the age of a file
        # stepped over between its claim and its validation is read from its ctime, the wall clock's.
        wait_for(lambda: journal_rows(tmp_path) > 0, message=lambda: daemon_log(proc)[-2000:])
        before = heartbeat_time(tmp_path)
        step(offset, 2 * 3600)
        wait_for(lambda: heartbeat_time(tmp_path) > before + 3600, message="the daemon's clock did not step")
        time.sleep(3)  # several sweeps (1 s) by the stepped clock
        assert files_in(tmp_path / "spool", "failed") == [], daemon_log(proc)[-3000:]
        assert len(files_in(tmp_path / "spool", "sending")) == 1
        assert "clock was stepped forward by 7200 s" in daemon_log(proc)
        back = restart(pacs)
        wait_for(lambda: files_in(tmp_path / "spool", "sent"), timeout=30, message=lambda: daemon_log(proc)[-2000:])
        assert back.list_instance_uids() == {sop}
    finally:
        assert stop_daemon(proc) == 0, daemon_log(proc)[-3000:]
        if back is not None:
            back.stop(timeout=0)


def test_a_clock_step_back_keeps_the_probe_and_heartbeat_running(tmp_path, orthanc_factory):
    """An hour back: apscheduler would hold every interval job for an hour, and a PACS marked DOWN would
    stay DOWN. It must be found back up within a few probe intervals and get the file."""
    offset = tmp_path / "faketime-offset"
    env = faketime_env(offset)
    pacs = orthanc_factory()
    cfg = write_config(tmp_path, pacs)
    proc = start_daemon(cfg, env)
    back = None
    try:
        wait_ready(proc)
        pacs.stop(timeout=0)
        wait_for(lambda: "is DOWN" in daemon_log(proc), message=lambda: daemon_log(proc)[-2000:])
        time.sleep(1.5)  # the jobs' next runs are planned by the clock before the step
        stepped = heartbeat_time(tmp_path)
        step(offset, -3600)
        wait_for(lambda: 0 < heartbeat_time(tmp_path) < stepped - 3000, timeout=10, message="no heartbeat after the step")
        back = restart(pacs)
        wait_for(lambda: "reachable again" in daemon_log(proc), timeout=15, message=lambda: daemon_log(proc)[-2000:])
        sop = write_instance(tmp_path / "spool" / "inbox" / "img.dcm")
        wait_for(lambda: files_in(tmp_path / "spool", "sent"), timeout=15, message=lambda: daemon_log(proc)[-2000:])
        assert back.list_instance_uids() == {sop}
        beat = heartbeat_time(tmp_path)
        wait_for(lambda: heartbeat_time(tmp_path) > beat + 0.5, timeout=10, message="the heartbeat stopped")
        assert "clock was stepped back by 3600 s" in daemon_log(proc)
    finally:
        assert stop_daemon(proc) == 0, daemon_log(proc)[-3000:]
        if back is not None:
            back.stop(timeout=0)
