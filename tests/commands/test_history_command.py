"""`relaypacsd history`: filters, formats, times, and its input checks, on a journal written here."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time

import pytest

from relaypacsd import cli
from relaypacsd.history import HistoryRecord
from relaypacsd.journal import open_journal
from tests.commands.helpers import clean_env, write_config

STUDY, OTHER = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


@pytest.fixture(autouse=True)
def _no_operator_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ORTHANC_", "DCM4CHEE_", "ACTIVE_PACS", "PACS_", "RELAYPACS_CONFIG")):
            monkeypatch.delenv(k)


def rec(t, **fields):
    base = dict(watch="/srv/ct", file="CT1/IM1.dcm", sop_instance_uid=STUDY + ".1", study_instance_uid=STUDY,
                series_instance_uid=STUDY + ".9", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", patient_id="P1",
                accession_number="A1", modality="CT", destination="orthanc", outcome="delivered", status_code=200,
                reason="delivered (HTTP 200): stored", bytes=39000, attempt=1, duration_ms=12.34)
    return HistoryRecord(t, **{**base, **fields})


@pytest.fixture
def conf(tmp_path):
    """A config whose journal holds 60 records of STUDY a minute apart, the newest now, and 2 of OTHER."""
    path = write_config(tmp_path, url="http://127.0.0.1:9")
    now = time.time()
    journal = open_journal(tmp_path / "state")
    journal.record_history([rec(now - (60 - i) * 60, file=f"CT1/IM{i}.dcm") for i in range(1, 61)])
    journal.record_history([
        rec(now - 3 * 86400, study_instance_uid=OTHER, patient_id="P2", accession_number="A2", file="MR/a.dcm",
            modality="MR", destination="breast", outcome="failed", status_code=409,
            reason='permanent [0xA900] (HTTP 409): PACS refused it, "twice"\nsecond line'),
        rec(now - 2 * 86400, study_instance_uid=OTHER, file="MR/a.dcm", destination="", outcome="requeued",
            status_code=None, duration_ms=None, attempt=0, user="alice", reason="back to sending/ by alice")])
    journal.close()
    return path


def run(capsys, conf, *args):
    code = cli.main(["-c", str(conf), "history", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_default_is_a_table_of_the_newest_fifty_newest_first(conf, capsys):
    code, out, _ = run(capsys, conf)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["time", "(UTC)", "PACS"] and len(lines) == 2 + 50
    assert "CT1/IM60.dcm" in lines[2] and "CT1/IM11.dcm" in lines[-1] and "IM10.dcm" not in out
    assert "delivered" in lines[2] and "P1" in lines[2] and "12" in lines[2]


def test_where_did_this_study_go(conf, capsys):
    code, out, _ = run(capsys, conf, "--study", OTHER)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and "requeued" in lines[2] and "failed" in lines[3]
    assert "breast" in lines[3] and "409" in lines[3] and "alice" in lines[2]  # the user column: some record has one
    assert "user" in lines[0]


@pytest.mark.parametrize("args, n", [
    (["--patient", "P2"], 1), (["--accession", "A2"], 1), (["--sop", STUDY + ".1", "--limit", "0"], 62),
    (["--file", "MR/a.dcm"], 2), (["--pacs", "breast"], 1), (["--outcome", "requeued"], 1),
    (["--since", "30m"], 30), (["--until", "1d"], 2), (["--since", "4d", "--until", "2.5d"], 1),
    (["--limit", "0"], 62), (["--limit", "5"], 5), (["--pacs", "orthanc", "--outcome", "failed"], 0)])
def test_each_filter(conf, capsys, args, n):
    code, out, _ = run(capsys, conf, *args, "--format", "json")
    assert code == 0 and len(json.loads(out)) == n


def test_a_path_in_a_watch_root_is_looked_up_by_its_claim_name(conf, capsys, tmp_path):
    code, out, _ = run(capsys, conf, "--file", str(tmp_path / "spool" / "failed" / "MR" / "a.dcm"), "--format", "json")
    assert code == 0 and [r["file"] for r in json.loads(out)] == ["MR/a.dcm", "MR/a.dcm"]


def test_an_iso_time_bounds_it_too(conf, capsys):
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 10 * 60 - 30))  # UTC, no offset
    code, out, _ = run(capsys, conf, "--since", since, "--format", "json")
    assert code == 0 and len(json.loads(out)) == 11  # 10 minutes ago to now, a minute apart


def test_csv_is_rfc_4180_with_a_header_row(conf, capsys):
    code, out, _ = run(capsys, conf, "--study", OTHER, "--format", "csv")
    assert code == 0 and out.startswith("time,watch,file,sop_instance_uid,") and "\r\n" in out
    assert out.count("\r\n") == 3  # header and two records: the reason's line break stays inside its quotes
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert [r["outcome"] for r in rows] == ["requeued", "failed"]
    assert rows[1]["reason"] == 'permanent [0xA900] (HTTP 409): PACS refused it, "twice"\nsecond line'
    assert '"permanent [0xA900] (HTTP 409): PACS refused it, ""twice""\nsecond line"' in out  # quotes doubled
    assert rows[0]["status_code"] == "" and rows[0]["user"] == "alice" and rows[1]["time"].endswith("+00:00")


def test_json_has_every_field_and_iso_times(conf, capsys):
    code, out, _ = run(capsys, conf, "--patient", "P2", "--format", "json")
    [doc] = json.loads(out)
    assert list(doc) == ["time", "watch", "file", "sop_instance_uid", "sop_class_uid", "series_instance_uid",
                         "study_instance_uid", "patient_id", "accession_number", "modality", "route", "destination",
                         "outcome", "status_code", "reason", "bytes", "attempt", "duration_ms", "user"]
    assert doc["time"].endswith("+00:00") and doc["status_code"] == 409 and doc["duration_ms"] == 12.3


def test_nothing_matching_is_said_in_each_format(conf, capsys):
    assert run(capsys, conf, "--patient", "nobody")[1] == "no history record matches\n"
    assert run(capsys, conf, "--patient", "nobody", "--format", "json")[1] == "[]\n"
    assert run(capsys, conf, "--patient", "nobody", "--format", "csv")[1].count("\r\n") == 1


@pytest.mark.parametrize("args, words", [
    (["--since", "yesterday"], "--since: 'yesterday' is neither a time ago"),
    (["--study", "1.2.x"], "--study '1.2.x' is not a DICOM UID"),
    (["--limit", "-1"], "--limit -1: use a number of records, or 0 for every match")])
def test_bad_input_is_one_line_naming_the_flag(conf, capsys, args, words):
    code, out, err = run(capsys, conf, *args)
    assert code != 0 and words in err and "Traceback" not in err and err.count("\n") == 1


def test_an_unknown_outcome_lists_the_known_ones(conf, capsys):
    with pytest.raises(SystemExit) as exc:
        run(capsys, conf, "--outcome", "lost")
    assert exc.value.code == 2 and "retries_exhausted" in capsys.readouterr().err


def test_no_journal_says_where_it_looked(tmp_path, capsys):
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    code, _, err = run(capsys, conf)
    assert code == 1 and f"no journal in {tmp_path / 'state'}" in err


def test_it_reads_while_a_writer_holds_the_journal_and_changes_nothing(conf, capsys, tmp_path):
    """Safe while the daemon runs: the read-only look waits for no lock and writes nothing."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # the daemon in the middle of a commit
    db.execute("DELETE FROM delivery_history")
    try:
        before = os.stat(tmp_path / "state" / "journal.sqlite3").st_mtime_ns
        started = time.monotonic()
        code, out, _ = run(capsys, conf, "--study", OTHER, "--format", "json")
        assert code == 0 and len(json.loads(out)) == 2 and time.monotonic() - started < 2
        assert os.stat(tmp_path / "state" / "journal.sqlite3").st_mtime_ns == before
    finally:
        db.execute("ROLLBACK")
        db.close()


def test_as_a_subprocess(conf):
    res = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(conf), "history", "--outcome", "failed"],
                         capture_output=True, text=True, env=clean_env(), timeout=60)
    assert res.returncode == 0 and "breast" in res.stdout and len(res.stdout.splitlines()) == 3


def test_it_starts_without_pydicom_or_loguru(conf):
    """Most of the command's 200 ms would be their import: a quick look must not pay for it."""
    code = ("import sys; from relaypacsd import cli; cli.main(['-c', sys.argv[1], 'history', '--study', sys.argv[2]]); "
            "print(sorted(m for m in ('pydicom', 'loguru', 'numpy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, str(conf), OTHER], capture_output=True, text=True,
                         env=clean_env(), timeout=60)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "[]", res.stdout + res.stderr
