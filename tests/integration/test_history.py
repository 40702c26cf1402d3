"""Where did this study go: the real daemon delivers to the real Orthanc, `relaypacsd history` answers while it runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.dicomfactory import write_study
from tests.integration.daemon_helpers import (count_in, daemon_env, daemon_log, start_daemon, stop_daemon, wait_for,
                                              wait_ready, write_config)


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), *args], capture_output=True, text=True,
                         env=daemon_env({"SUDO_USER": "nurse.jones"}), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _history(cfg: Path, *args: str) -> list[dict]:
    return json.loads(_cli(cfg, "history", "--format", "json", *args).stdout)


def test_history_answers_where_a_study_went_while_the_daemon_runs(tmp_path: Path, clean_orthanc) -> None:
    cfg = write_config(tmp_path, clean_orthanc)
    n = 5
    study, sops = write_study(tmp_path / "staging", n)
    for f in (tmp_path / "staging").iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.AccessionNumber, ds.PatientName = "PID-4711", "ACC-0815", "Secret^Name"
        ds.save_as(f, enforce_file_format=True)
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        for f in sorted((tmp_path / "staging").iterdir()):
            f.rename(tmp_path / "spool" / "inbox" / f.name)
        (tmp_path / "spool" / "inbox" / "junk.dcm").write_bytes(b"no dicom here" * 20)
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == n and count_in(tmp_path / "spool", "failed") == 1,
                 30, message=lambda: daemon_log(proc)[-3000:])
        delivered = _history(cfg, "--study", study)
        assert {r["sop_instance_uid"] for r in delivered} == set(sops)
        assert {(r["destination"], r["outcome"], r["status_code"], r["patient_id"], r["accession_number"],
                 r["modality"]) for r in delivered} == {("orthanc", "delivered", 200, "PID-4711", "ACC-0815", "CT")}
        assert all(r["duration_ms"] > 0 and r["attempt"] == 1 and r["bytes"] > 0 for r in delivered)
        assert _history(cfg, "--patient", "PID-4711", "--since", "1h", "--format", "json") == delivered
        [refused] = _history(cfg, "--outcome", "refused")
        assert refused["file"] == "junk.dcm" and refused["reason"].startswith("validation: not a DICOM file")
        _cli(cfg, "retry", str(tmp_path / "spool" / "failed" / "junk.dcm"))
        [requeued] = _history(cfg, "--outcome", "requeued")
        assert (requeued["file"], requeued["user"], requeued["destination"]) == ("junk.dcm", "nurse.jones", "")
        table = _cli(cfg, "history", "--study", study).stdout
        assert len(table.splitlines()) == 2 + n and "PID-4711" in table
    finally:
        assert stop_daemon(proc) == 0
    state = tmp_path / "state"
    modes = {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in state.iterdir() if f.name.startswith("journal")}
    assert "journal.sqlite3" in modes and set(modes.values()) == {0o600}, modes  # it holds PatientIDs
    assert b"Secret^Name" not in (state / "journal.sqlite3").read_bytes()
    assert "Secret" not in daemon_log(proc)
