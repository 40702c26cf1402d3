"""The operator commands against a real Orthanc, in-process (cli.main) and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from relaypacsd import cli
from relaypacsd.localorthanc import free_port
from tests.commands.helpers import clean_env, write_config
from tests.dicomfactory import write_instance, write_study


@pytest.fixture
def conf(clean_orthanc, tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ORTHANC_", "DCM4CHEE_", "ACTIVE_PACS", "PACS_", "RELAYPACS_CONFIG")):
            monkeypatch.delenv(k)
    return write_config(tmp_path, url=clean_orthanc.url, username=clean_orthanc.username,
                        password=clean_orthanc.password, dicom_port=clean_orthanc.dicom_port)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaypacsd", *args], capture_output=True, text=True,
                          env=clean_env(), timeout=120)


def test_send_then_query_verify_retrieve(conf, clean_orthanc, tmp_path, capsys):
    study, sops = write_study(tmp_path / "in" / "sub", 3)
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    code = cli.main(["-c", str(conf), "send", str(tmp_path / "in")])
    out = capsys.readouterr().out
    assert code == 1  # notes.txt is invalid
    assert "orthanc" in out and "notes.txt" in out and "invalid" in out
    assert set(sops) <= clean_orthanc.list_instance_uids()
    assert (tmp_path / "in" / "sub" / "img00000.dcm").exists()  # not moved

    assert cli.main(["-c", str(conf), "send", "--json", str(tmp_path / "in" / "sub")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["summary"][0]["sent"] + summary["summary"][0]["duplicates"] == 3

    assert cli.main(["-c", str(conf), "query", "--study-uid", study]) == 0
    out = capsys.readouterr().out
    assert study in out and "PatientName" not in out
    assert cli.main(["-c", str(conf), "query", "--json", "--show-names", "--modality", "CT"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["StudyUID"] == study and "PatientName" in r for r in rows)

    assert cli.main(["-c", str(conf), "verify", study]) == 0
    assert capsys.readouterr().out.count("yes") == 3
    assert cli.main(["-c", str(conf), "verify", str(tmp_path / "in" / "sub")]) == 0
    capsys.readouterr()

    out_dir = tmp_path / "out"
    assert cli.main(["-c", str(conf), "retrieve", study, "--out", str(out_dir)]) == 0
    assert "retrieved 3 instance(s)" in capsys.readouterr().out
    assert sorted(p.stem for p in out_dir.glob("*.dcm")) == sorted(sops)


def test_verify_reports_missing_and_fails(conf, tmp_path, capsys):
    write_instance(tmp_path / "x" / "a.dcm")
    assert cli.main(["-c", str(conf), "verify", str(tmp_path / "x")]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_subprocess_query_send_status_check(conf, clean_orthanc, tmp_path):
    study, _ = write_study(tmp_path / "s", 2)
    res = run("-c", str(conf), "send", str(tmp_path / "s"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all delivered" in res.stdout
    res = run("-c", str(conf), "query", "--study-uid", study)
    assert res.returncode == 0 and study in res.stdout
    res = run("-c", str(conf), "check")
    assert res.returncode == 0, res.stdout
    for word in ("DNS", "TCP", "credentials", "DICOMweb endpoint", "C-ECHO"):
        assert word in res.stdout
    res = run("-c", str(conf), "status")
    assert res.returncode == 0 and "inbox" in res.stdout and "orthanc" in res.stdout
    res = run("-c", str(conf), "verify", study)
    assert res.returncode == 0


@pytest.mark.parametrize("argv, words", [
    (["query", "--to", "nope"], "unknown PACS 'nope'"),
    (["retrieve", "1.2.x", "--out", "o"], "is not a DICOM UID"),
    (["query", "--study-date", "2024-01-01"], "--study-date"),
    (["verify", "1.2.3.4.5.6"], "not found"),
    (["send", "/nonexistent/path"], "no such file"),
    (["retry", "/tmp/not-in-failed.dcm"], "no such file"),
    (["retry"], "--all"),
])
def test_bad_input_one_line_and_nonzero(conf, argv, words, capsys):
    assert cli.main(["-c", str(conf), *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("relaypacsd: error:") and words in err and len(err.splitlines()) == 1
    res = run("-c", str(conf), *argv)
    assert res.returncode != 0 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unreachable_pacs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ORTHANC_URL", raising=False)
    conf = write_config(tmp_path, url=f"http://127.0.0.1:{free_port()}", dicom_port=free_port())
    assert cli.main(["-c", str(conf), "query"]) == 1
    assert "unreachable" in capsys.readouterr().err
    assert cli.main(["-c", str(conf), "check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL PACS orthanc TCP" in out and "PACS unreachable" in out and "C-ECHO" in out
    write_instance(tmp_path / "u" / "a.dcm")
    assert cli.main(["-c", str(conf), "send", str(tmp_path / "u")]) == 1
    assert "NOT everything" in capsys.readouterr().out


def test_check_bad_password(clean_orthanc, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ORTHANC_PASSWORD", raising=False)
    conf = write_config(tmp_path, url=clean_orthanc.url, username=clean_orthanc.username, password="wrong")
    assert cli.main(["-c", str(conf), "check"]) == 1
    assert "Authentication failed" in capsys.readouterr().out


def test_send_fallback_via_cstore(clean_orthanc, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ORTHANC_URL", raising=False)
    conf = write_config(tmp_path, url=f"http://127.0.0.1:{free_port()}", dicom_port=clean_orthanc.dicom_port,
                        fallback="cstore")
    _, sops = write_study(tmp_path / "fb", 2)
    assert cli.main(["-c", str(conf), "send", str(tmp_path / "fb")]) == 0
    assert set(sops) <= clean_orthanc.list_instance_uids()
