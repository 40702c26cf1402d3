"""The operator's retry as a library call: what `retry` and later the dashboard use; it never prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaypacsd.errors import RequeueError
from relaypacsd.history import HistoryQuery
from relaypacsd.journal import Journal, open_journal
from relaypacsd.requeue import requeue
from relaypacsd.sidecars import sidecar_path, write_sidecar
from relaypacsd.spool import Spool
from tests.dicomfactory import write_instance
from tests.helpers import refuse_sidecar_removal


def _failed(tmp_path: Path) -> tuple[Spool, Journal, Path]:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    bad = spool.failed / "sub" / "bad.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"y")
    write_sidecar(bad, {"reason": "PACS refused it"})
    journal = open_journal(tmp_path)
    journal.ensure(str(bad), ["orthanc", "other"], first_seen=1.0)
    journal.update(str(bad), "orthanc", state="failed", event="failed", detail="permanent: nope")
    journal.update(str(bad), "other", state="delivered", event="delivered")
    return spool, journal, bad


def test_requeue_returns_where_the_file_went_and_which_pacs_get_it_again(tmp_path, capsys):
    spool, journal, bad = _failed(tmp_path)
    try:
        done = requeue(spool, journal, bad)
        rows = journal.rows(str(done.new_path))
    finally:
        journal.close()
    assert done.new_path == spool.sending / "sub" / "bad.dcm" and done.new_path.is_file()
    assert done.reset_dests == ["orthanc"] and done.warnings == []
    assert {d: r.state for d, r in rows.items()} == {"orthanc": "pending", "other": "delivered"}
    assert not sidecar_path(bad).exists() and capsys.readouterr().out == ""


def test_a_sidecar_left_behind_is_a_warning_in_the_result_not_output(tmp_path, capsys, monkeypatch):
    spool, journal, bad = _failed(tmp_path)
    refuse_sidecar_removal(monkeypatch)
    try:
        done = requeue(spool, journal, bad)
    finally:
        journal.close()
    assert done.new_path.is_file() and len(done.warnings) == 1
    assert "could not remove" in done.warnings[0] and str(sidecar_path(bad)) in done.warnings[0]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("with_journal", [True, False])
def test_a_file_that_cannot_be_moved_raises_our_error_naming_it(tmp_path, with_journal):
    spool, journal, bad = _failed(tmp_path)
    bad.unlink()  # gone between the listing and the move
    try:
        with pytest.raises(RequeueError, match="cannot move it back to sending/") as caught:
            requeue(spool, journal if with_journal else None, bad)
        if with_journal:
            assert {d: r.state for d, r in journal.rows(str(bad)).items()} == {"orthanc": "pending", "other": "delivered"}
    finally:
        journal.close()
    assert str(bad) in str(caught.value)


def test_a_retry_is_in_the_history_naming_the_operator_and_each_pacs_that_gets_it_again(tmp_path):
    spool, journal, bad = _failed(tmp_path)
    sop = write_instance(bad)  # a real instance: its record names it
    try:
        requeue(spool, journal, bad, user="alice")
        found = journal.find_history(HistoryQuery())
    finally:
        journal.close()
    assert [(r.destination, r.outcome, r.user, r.file, r.sop_instance_uid) for r in found] == [
        ("orthanc", "requeued", "alice", "sub/bad.dcm", sop)]  # not "other": it has the file
    assert found[0].reason == "back to sending/ by alice; was: PACS refused it"


def test_a_refused_file_retried_gets_one_record_without_a_pacs_and_a_failed_move_none(tmp_path):
    spool, journal, bad = _failed(tmp_path)
    refused = spool.failed / "junk.bin"
    refused.write_bytes(b"junk")  # validation refused it: no rows
    try:
        requeue(spool, journal, refused)
        bad.unlink()
        with pytest.raises(RequeueError):
            requeue(spool, journal, bad, user="bob")
        found = journal.find_history(HistoryQuery())
    finally:
        journal.close()
    assert [(r.destination, r.file, r.user, r.reason) for r in found] == [
        ("", "junk.bin", "", "back to sending/ by an operator")]
