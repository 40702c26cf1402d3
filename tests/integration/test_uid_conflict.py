"""One SOPInstanceUID, other content, against the real daemon and the real Orthanc (which answers 200 for a
corrected resend and silently keeps the first version): a UID conflict in failed/, never "delivered"."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from relaypacsd.localorthanc import LocalOrthanc
from tests.dicomfactory import write_instance
from tests.integration.daemon_helpers import (daemon_env, daemon_log, files_in, start_daemon, stop_daemon, wait_for,
                                              wait_ready, write_config)


def corrected(src: Path, dest: Path, name: str) -> Path:
    """The instance of `src` with another PatientName, its SOPInstanceUID kept."""
    ds = pydicom.dcmread(src)
    ds.PatientName = name
    ds.save_as(dest, enforce_file_format=True)
    return dest


def patient_name_at(orthanc: LocalOrthanc, sop: str) -> str:
    (found,) = orthanc.rest("POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop}})
    return orthanc.rest("GET", f"/instances/{found}/simplified-tags")["PatientName"]


def drop(src: Path, inbox: Path) -> None:
    """Into the inbox by rename, as a complete file arrives."""
    tmp = inbox.parent / f"staging-{src.name}"
    shutil.copy(src, tmp)
    tmp.rename(inbox / src.name)


def names(root: Path, folder: str) -> list[str]:
    return [p.name for p in files_in(root, folder)]


def relaypacsd(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), *args], capture_output=True,
                          text=True, env=daemon_env(), timeout=60)


def test_a_corrected_file_with_a_sent_uid_is_a_conflict_and_the_same_bytes_a_duplicate(tmp_path, clean_orthanc):
    spool, staging = tmp_path / "spool", tmp_path / "staging"
    a = staging / "a.dcm"
    sop = write_instance(a)
    original = str(pydicom.dcmread(a).PatientName)
    b = corrected(a, staging / "b.dcm", "CORRECTED^NAME")
    shutil.copy(a, staging / "a-again.dcm")
    cfg = write_config(tmp_path, clean_orthanc)
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        inbox = spool / "inbox"
        drop(a, inbox)
        wait_for(lambda: names(spool, "sent") == ["a.dcm"], message=lambda: daemon_log(proc)[-3000:])
        drop(b, inbox)
        wait_for(lambda: names(spool, "failed") == ["b.dcm"], message=lambda: daemon_log(proc)[-3000:])
        drop(staging / "a-again.dcm", inbox)  # the same bytes again: a plain duplicate
        wait_for(lambda: names(spool, "sent") == ["a-again.dcm", "a.dcm"], message=lambda: daemon_log(proc)[-3000:])
        status = json.loads(relaypacsd(cfg, "status", "--json").stdout)
    finally:
        stop_daemon(proc)
    log = daemon_log(proc)
    assert f"PACS forward orthanc UID conflict: b.dcm uid={sop}: the PACS answered HTTP 200, stored" in log
    assert [l for l in log.splitlines() if "UID conflict: b.dcm" in l and "ERROR" in l]
    side = json.loads((spool / "failed" / "b.dcm.error.json").read_text())
    conflict = side["uid_conflict"]["orthanc"]
    assert conflict["earlier_file"] == "a.dcm" and conflict["pacs_answer"]["http_status"] == 200
    assert conflict["pacs_answer"]["answer"] == "stored" and "may have kept" in conflict["note"]
    assert "new SOPInstanceUID" in side["next_step"] and side["pacs"]["orthanc"]["state"] == "failed"
    assert patient_name_at(clean_orthanc, sop) == original != "CORRECTED^NAME"  # Orthanc kept a's version
    assert clean_orthanc.count_instances() == 1
    # The counters live in the destinations row, which this daemon writes on a health change only; the
    # count itself is checked in tests/commands (test_status_counts_uid_conflicts_per_pacs).
    assert "uid_conflicts" in status["pacs"][0]

    # The operator deletes the old instance at the PACS and retries: the corrected file goes through.
    clean_orthanc.reset()
    res = relaypacsd(cfg, "retry", str(spool / "failed" / "b.dcm"))
    assert res.returncode == 0, res.stdout + res.stderr
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        wait_for(lambda: names(spool, "sent") == ["a-again.dcm", "a.dcm", "b.dcm"],
                 message=lambda: daemon_log(proc)[-3000:])
    finally:
        stop_daemon(proc)
    assert names(spool, "failed") == [] and patient_name_at(clean_orthanc, sop) == "CORRECTED^NAME"


def test_two_versions_of_one_uid_dropped_together(tmp_path, clean_orthanc):
    """Both in sending/ at once, two workers: the first reaches Orthanc and sent/, the second waits for that
    answer and conflicts; what Orthanc holds is the version in sent/."""
    spool, staging = tmp_path / "spool", tmp_path / "staging"
    first = staging / "first.dcm"
    sop = write_instance(first)
    second = corrected(first, staging / "second.dcm", "CORRECTED^NAME")
    cfg = write_config(tmp_path, clean_orthanc, delivery={"workers_per_pacs": 2})
    (spool / "inbox").mkdir(parents=True)
    for f in (first, second):  # waiting before the start: claimed together
        shutil.copy(f, spool / "inbox" / f.name)
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        wait_for(lambda: len(names(spool, "sent")) == 1 and len(names(spool, "failed")) == 1,
                 message=lambda: daemon_log(proc)[-3000:])
    finally:
        stop_daemon(proc)
    (kept,) = files_in(spool, "sent")
    (refused,) = files_in(spool, "failed")
    assert patient_name_at(clean_orthanc, sop) == str(pydicom.dcmread(kept).PatientName)
    side = json.loads(refused.with_name(refused.name + ".error.json").read_text())
    assert side["uid_conflict"]["orthanc"]["earlier_file"] == kept.name
    assert f"UID conflict: {refused.name} uid={sop}" in daemon_log(proc)
