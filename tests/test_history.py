"""The history's types and words: times the operator types, and what a record of a file read here holds."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pydicom
import pytest

from relaypacsd import history
from relaypacsd.history import HistoryRecord, parse_time, record_of_file
from relaypacsd.spool import Spool
from tests.dicomfactory import fresh

NOW = 1_700_000_000.0


@pytest.mark.parametrize("text, ago", [("45s", 45), ("30m", 1800), ("2h", 7200), ("3d", 3 * 86400),
                                       ("1w", 7 * 86400), ("1.5h", 5400), (" 2H ", 7200)])
def test_a_time_ago(text, ago):
    assert parse_time(text, NOW) == NOW - ago


@pytest.mark.parametrize("text, expected", [
    ("2024-05-01", datetime(2024, 5, 1, tzinfo=timezone.utc)),
    ("2024-05-01T08:30", datetime(2024, 5, 1, 8, 30, tzinfo=timezone.utc)),  # no offset: UTC, as shown
    ("2024-05-01T08:30:00Z", datetime(2024, 5, 1, 8, 30, tzinfo=timezone.utc)),
    ("2024-05-01T08:30:00+02:00", datetime(2024, 5, 1, 6, 30, tzinfo=timezone.utc)),
    ("2024-05-01 08:30:15.5", datetime(2024, 5, 1, 8, 30, 15, 500000, tzinfo=timezone.utc))])
def test_an_iso_8601_time(text, expected):
    assert parse_time(text, NOW) == expected.timestamp()


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-2h", "2024-13-01", "", "3 days"])
def test_anything_else_says_what_is_accepted(text):
    with pytest.raises(ValueError, match=r"2h, 3d.*ISO 8601"):
        parse_time(text, NOW)


def test_a_record_never_has_room_for_a_patient_name():
    assert not [f.name for f in dataclasses.fields(HistoryRecord) if "name" in f.name]


def test_the_outcome_names_are_distinct_and_listed():
    assert len(set(history.OUTCOMES)) == len(history.OUTCOMES) == 11
    assert {history.DELIVERED, history.REFUSED, history.REQUEUED, history.UID_CONFLICT} <= set(history.OUTCOMES)


def test_a_file_read_here_gives_its_identifiers_not_its_patient_name(tmp_path):
    spool = Spool(tmp_path)
    spool.prepare()
    ds = fresh()
    ds.PatientID, ds.AccessionNumber, ds.PatientName = "P-1", "A-1", "Doe^Jane"
    path = spool.failed / "CT1" / "IM1.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    r = record_of_file(spool, path, NOW, outcome=history.REQUEUED, reason="why", user="alice",
                       name=spool.sending / "CT1" / "IM1~1.dcm")
    assert (r.sop_instance_uid, r.study_instance_uid, r.series_instance_uid, r.sop_class_uid) == (
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID)
    assert (r.patient_id, r.accession_number, r.modality, r.bytes) == ("P-1", "A-1", "CT", path.stat().st_size)
    assert (r.file, r.watch, r.user, r.outcome, r.time) == ("CT1/IM1~1.dcm", str(tmp_path), "alice", "requeued", NOW)
    assert "Doe" not in repr(r)


def test_a_file_that_is_no_dicom_still_gets_a_record_without_uids(tmp_path):
    spool = Spool(tmp_path)
    spool.prepare()
    (spool.failed / "junk.txt").write_bytes(b"not dicom at all")
    r = record_of_file(spool, spool.failed / "junk.txt", NOW, outcome=history.REFUSED, reason="validation: junk")
    assert (r.file, r.sop_instance_uid, r.study_instance_uid, r.bytes) == ("junk.txt", "", "", 16)
    gone = record_of_file(spool, spool.failed / "gone.dcm", NOW, outcome=history.REFUSED)
    assert (gone.file, gone.bytes) == ("gone.dcm", 0)


def test_pydicom_is_never_asked_for_more_than_the_identifiers(tmp_path, monkeypatch):
    """Never pixel data, never PatientName: what record_of_file asks pydicom for."""
    asked = {}
    real = pydicom.dcmread

    def spy(path, **kwargs):
        asked.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    spool = Spool(tmp_path)
    spool.prepare()
    fresh().save_as(spool.failed / "a.dcm", enforce_file_format=True)
    record_of_file(spool, spool.failed / "a.dcm", NOW, outcome=history.REFUSED)
    assert asked["stop_before_pixels"] is True and "PatientName" not in asked["specific_tags"]
