"""Each answer's history record, written by the engine in the commit that records the answer (records.py)."""

from __future__ import annotations

import time

import pydicom

from relaypacsd import history
from relaypacsd.dicomfile import inspect
from relaypacsd.errors import DestinationProblem
from relaypacsd.history import HistoryQuery
from relaypacsd.outcomes import Outcome
from tests.helpers import ScriptedPacs, count, engine_setup, submit_all, wait_until


def _records(engine, **query):
    return engine.journal.find_history(HistoryQuery(limit=0, **query))


def _tag_study(spool, patient="PAT-7", accession="ACC-9"):
    """Give the instances in inbox/ a PatientID, AccessionNumber and a PatientName that must never be recorded."""
    for f in spool.files("inbox"):
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.AccessionNumber, ds.PatientName = patient, accession, "Doe^Jane"
        ds.save_as(f, enforce_file_format=True)


def test_a_delivered_instance_has_one_record_with_what_identifies_it_and_the_answer(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = engine_setup(tmp_path, [pacs], n=3)
    _tag_study(spool)
    submit_all(engine, spool)
    files = {str(spool.relative(p)): p for p in spool.files("sending")}
    sizes = {rel: p.stat().st_size for rel, p in files.items()}  # random UIDs: the files differ by a few bytes
    before = time.time()
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 3)
    engine.stop()
    found = _records(engine)
    assert len(found) == 3 and {r.sop_instance_uid for r in found} == set(sops)
    r = found[0]
    ds = pydicom.dcmread(spool.sent / r.file, stop_before_pixels=True)
    assert (r.study_instance_uid, r.series_instance_uid, r.sop_class_uid) == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID)
    assert (r.patient_id, r.accession_number, r.modality) == ("PAT-7", "ACC-9", "CT")
    assert (r.destination, r.outcome, r.status_code, r.attempt, r.bytes) == ("orthanc", "delivered", 200, 1, sizes.get(r.file))
    assert r.watch == str(spool.root) and r.file in files and r.reason == "delivered (HTTP 200): scripted delivered"
    assert r.duration_ms is not None and r.duration_ms >= 0 and before <= r.time <= time.time()
    assert "Doe" not in repr(found)  # PatientName is never recorded


def test_every_outcome_has_its_name_in_the_history(tmp_path):
    """waiting, then retries_exhausted for an unclear rejection; failed for a permanent one; duplicate."""
    rules = {}
    pacs = ScriptedPacs("orthanc", lambda uid, n, call: rules[uid])
    engine, spool, sops = engine_setup(tmp_path, [pacs], n=3, retry_attempts=1)
    rules.update({sops[0]: Outcome.LIMITED, sops[1]: Outcome.PERMANENT, sops[2]: Outcome.DUPLICATE})
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: (engine.destinations["orthanc"].release_due(everything=True) or True)
                      and count(spool, "failed") == 2 and count(spool, "sent") == 1, timeout=15)
    engine.stop()
    by_sop = {sop: [(r.outcome, r.attempt) for r in reversed(_records(engine, sop=sop))] for sop in sops}
    assert by_sop[sops[0]] == [("waiting", 1), ("waiting", 2), ("retries_exhausted", 3)]
    assert by_sop[sops[1]] == [("failed", 1)] and by_sop[sops[2]] == [("duplicate", 1)]
    assert "0xA900" in _records(engine, sop=sops[1])[0].reason  # the DICOM reason code in the words


def test_a_file_too_old_has_a_too_old_record(tmp_path):
    pacs = ScriptedPacs("orthanc", lambda uid, n, c: Outcome.TRANSIENT)
    engine, spool, sops = engine_setup(tmp_path, [pacs], n=1, retry_attempts=1, max_age_hours=0.0001)
    f = spool.claim(next(spool.files("inbox")))
    engine.journal.ensure(str(f), ["orthanc"], first_seen=time.time() - 3600)
    engine.submit(f, spool, inspect(f))
    engine.start()
    assert wait_until(lambda: count(spool, "failed") == 1)
    engine.stop()
    [record] = _records(engine)
    assert record.outcome == history.TOO_OLD and "gave up after" in record.reason


def test_a_uid_conflict_has_a_uid_conflict_record_and_the_earlier_delivery_its_own(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = engine_setup(tmp_path, [pacs], n=1)
    engine.start()
    try:
        submit_all(engine, spool)
        assert wait_until(lambda: count(spool, "sent") == 1)
        a = next(spool.files("sent"))
        ds = pydicom.dcmread(a)
        ds.PatientID = "CORRECTED"  # other bytes, the same SOPInstanceUID
        ds.save_as(spool.inbox / "b.dcm", enforce_file_format=True)
        submit_all(engine, spool)
        assert wait_until(lambda: count(spool, "failed") == 1)
    finally:
        engine.stop()
    assert [(r.file, r.outcome) for r in _records(engine, sop=sops[0])] == [("b.dcm", "uid_conflict"),
                                                                             (a.name, "delivered")]


def test_a_destination_problem_waits_without_spending_an_attempt_and_says_so(tmp_path):
    pacs = ScriptedPacs("orthanc")
    pacs.raise_next = [DestinationProblem("PACS 'orthanc': HTTP 403 forbidden", status=403)]
    engine, spool, sops = engine_setup(tmp_path, [pacs], n=1, retry_sweep_interval=3600)
    submit_all(engine, spool)
    engine.start()
    try:
        assert wait_until(lambda: len(_records(engine)) == 1)
    finally:
        engine.stop()
    [record] = _records(engine)
    assert (record.outcome, record.status_code, record.attempt) == ("waiting", 403, 1)
    assert engine.journal.rows(str(spool.sending / record.file))["orthanc"].attempts == 0


def test_no_record_with_history_off(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = engine_setup(tmp_path, [pacs], n=2, history_days=0)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 2)
    engine.stop()
    assert _records(engine) == []


def test_an_answer_about_a_file_changed_meanwhile_is_recorded_as_the_version_sent(tmp_path):
    """The PACS got the old bytes; the file was rewritten in sending/ while the request was in flight."""
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = engine_setup(tmp_path, [pacs], n=1)
    submit_all(engine, spool)
    [item] = list(engine._items.values())
    engine._untrack([item])  # what _drop_changed does to a file that changed: its answer is about the old one
    engine._record_many(engine.destinations["orthanc"], [(item, pacs.send([item.part])[0][0])], 12.0)
    [record] = _records(engine)
    assert (record.outcome, record.duration_ms) == ("delivered", 12.0) and "the version sent" in record.reason
    assert engine.journal.known_instances("orthanc", sops)  # remembered in the same commit
