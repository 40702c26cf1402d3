"""Nothing lost, nothing half-sent: SIGKILL the daemon process mid-delivery, restart it, check every file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.dicomfactory import write_study
from tests.integration.pipeline_helpers import files, leftovers, wait_for

N_VALID, N_BAD = 300, 10


def _config(tmp_path: Path, orthanc) -> Path:
    user, password = orthanc.auth
    cfg = tmp_path / "relaypacs.toml"
    cfg.write_text(f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
heartbeat_interval = 1.0
[delivery]
retry_delay = 0.2
retry_sweep_interval = 1.0
health_interval = 1.0
batch_max_instances = 10
workers_per_pacs = 2
[[watch]]
path = "{tmp_path / 'spool'}"
settle_seconds = 0.3
[pacs.orthanc]
type = "orthanc"
url = "{orthanc.url}"
username = "{user}"
password_file = "{tmp_path / 'pw'}"
""")
    (tmp_path / "pw").write_text(password)
    return cfg


def _start(cfg: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "run"], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def test_sigkill_mid_delivery_loses_nothing(tmp_path, clean_orthanc):
    cfg = _config(tmp_path, clean_orthanc)
    inbox = tmp_path / "spool" / "inbox"
    study, sops = write_study(tmp_path / "staging", N_VALID)
    for i in range(N_BAD):
        (tmp_path / "staging" / f"bad{i:02d}.dcm").write_bytes(b"not dicom " * (i + 1))
    names = sorted(p.name for p in (tmp_path / "staging").iterdir())
    log = tmp_path / "daemon.log"
    in_flight_at_kill = []
    proc = _start(cfg, log)
    try:
        assert wait_for(lambda: inbox.exists(), timeout=20)
        for p in sorted((tmp_path / "staging").iterdir()):
            os.replace(p, inbox / p.name)
        # Kill it twice while files are in flight: once early, once in the middle.
        for threshold in (20, 120):
            assert wait_for(lambda t=threshold: len(files(tmp_path, "sent")) >= t, timeout=60), log.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            in_flight_at_kill.append(len(files(tmp_path, "sending")))
            assert len(files(tmp_path, "sent")) < N_VALID, "finished before the kill: make the test harder"
            _assert_each_file_in_one_folder(tmp_path, names)
            proc = _start(cfg, log)
        assert wait_for(lambda: len(files(tmp_path, "sent")) == N_VALID and len(files(tmp_path, "failed")) == N_BAD
                        and not files(tmp_path, "inbox") and not files(tmp_path, "sending"), timeout=120), \
            log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    _assert_each_file_in_one_folder(tmp_path, names)
    assert leftovers(tmp_path) == []  # no temp file or orphan sidecar survives the restarts
    assert clean_orthanc.list_instance_uids() == set(sops)
    sent_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files(tmp_path, "sent")}
    assert sent_uids == set(sops)
    assert {p.name for p in files(tmp_path, "failed")} == {f"bad{i:02d}.dcm" for i in range(N_BAD)}
    assert all((p.parent / (p.name + ".error.json")).exists() for p in files(tmp_path, "failed"))
    assert len(in_flight_at_kill) == 2 and max(in_flight_at_kill) > 0, in_flight_at_kill


def _assert_each_file_in_one_folder(tmp_path: Path, names: list[str]) -> None:
    where: dict[str, list[str]] = {}
    for folder in ("inbox", "sending", "sent", "failed"):
        for p in files(tmp_path, folder):
            where.setdefault(p.name, []).append(folder)
    assert sorted(where) == names, "a file was lost or renamed"
    doubles = {n: f for n, f in where.items() if len(f) != 1}
    assert not doubles, doubles
