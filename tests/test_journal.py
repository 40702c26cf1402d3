"""The journal's lasting memory of confirmed instances, its in-place upgrade, and the retry's marked copies."""

import sqlite3
import time

import pytest

import relaypacsd.journal
from relaypacsd.journal import Journal, Update
from tests.helpers import OLD_SCHEMA


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite3")
    yield j
    j.close()


def delivered(path, sop, digest, dest="orthanc"):
    return Update(path, dest, "delivered", "delivered", sop=sop, digest=digest)


def test_an_older_journal_is_upgraded_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO deliveries (path, dest, sop, state, first_seen, updated) "
               "VALUES ('/s/sending/a.dcm', 'orthanc', '1.2.3', 'delivered', 1, 1)")
    db.execute("INSERT INTO destinations (dest, healthy, last_change, delivered) VALUES ('orthanc', 1, 1, 7)")
    db.commit()
    db.close()
    for _ in range(2):  # a second open finds everything in place
        j = Journal(path)
        assert j.rows("/s/sending/a.dcm")["orthanc"].state == "delivered"
        assert j.destinations()["orthanc"]["delivered"] == 7
        j.close()
    j = Journal(path)
    j.ensure("/s/sending/b.dcm", ["orthanc"], sop="1.2.4")
    j.apply([delivered("/s/sending/b.dcm", "1.2.4", "d1"),
             Update("/s/sending/a.dcm", "orthanc", "failed", "uid_conflict", "uid_conflict: x")])
    assert j.known_instances("orthanc", ["1.2.4"])["1.2.4"].digest == "d1"
    assert j._exec("SELECT conflicts FROM destinations") == [(1,)]
    j.close()


def test_a_confirmed_instance_is_remembered_after_its_rows_are_forgotten(journal):
    journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
    journal.apply([delivered("/s/sending/a.dcm", "1.2.3", "aaa")])
    journal.forget("/s/sending/a.dcm")  # the file reached sent/
    known = journal.known_instances("orthanc", ["1.2.3", "9.9"])
    assert set(known) == {"1.2.3"} and known["1.2.3"].digest == "aaa"
    assert known["1.2.3"].path == "/s/sending/a.dcm" and known["1.2.3"].time > time.time() - 60
    assert journal.known_instances("other", ["1.2.3"]) == {}  # per destination


def test_instances_older_than_the_memory_are_pruned_in_small_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(relaypacsd.journal, "PRUNE_EVERY", 4)
    monkeypatch.setattr(relaypacsd.journal, "PRUNE_STEP", 3)
    j = Journal(tmp_path / "journal.sqlite3", instance_days=1)
    old = time.time() - 2 * 86400
    j._tx([("INSERT INTO instances (dest, sop, digest, path, time) VALUES ('orthanc', ?, 'x', 'p', ?)",
            (f"1.{i}", old)) for i in range(5)])
    j.apply([delivered(f"/s/{i}", f"2.{i}", "y") for i in range(3)])
    assert len(j._exec("SELECT sop FROM instances")) == 8  # not yet: every 4 confirmations
    j.apply([delivered("/s/3", "2.3", "y")])
    assert len(j._exec("SELECT sop FROM instances WHERE sop LIKE '1.%'")) == 2  # one step of 3
    assert j.prune_instances() == 2
    assert sorted(r[0] for r in j._exec("SELECT sop FROM instances")) == ["2.0", "2.1", "2.2", "2.3"]
    j.close()


def test_a_retry_forgets_the_earlier_version_only_where_the_file_had_a_uid_conflict(journal):
    for dest in ("a", "b", "c"):
        journal.apply([delivered("/s/sending/first.dcm", "1.2.3", "old", dest)])
    key = "/s/failed/b.dcm"
    journal.ensure(key, ["a", "b", "c"], sop="1.2.3")
    journal.apply([Update(key, "a", "failed", "uid_conflict", "uid_conflict: earlier"),
                   Update(key, "b", "failed", "failed", "permanent: refused"),
                   Update(key, "c", "delivered", "delivered")])
    assert journal.conflicted(key) == {"a"}
    assert sorted(journal.reset_failed(key)) == ["a", "b"]
    assert set(journal._exec("SELECT dest FROM instances")) == {("b",), ("c",)}
    assert journal.conflicted(key) == set()  # the retry is now its last word


def test_a_copy_never_replaces_rows_of_a_file_at_the_new_name(journal):
    """The retry's look ("no rows there") and its copy used to be two steps: rows the daemon wrote between
    them were deleted by the copy."""
    journal.ensure("/s/failed/a.dcm", ["orthanc"], sop="1.2.3")
    journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="4.5.6")  # the daemon's claim, just now
    assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t1") is False
    assert journal.sop_of("/s/sending/a.dcm") == "4.5.6"
    assert journal.copy("/s/failed/a.dcm", "/s/sending/a~1.dcm", "t1") is True
    assert journal.sop_of("/s/sending/a~1.dcm") == "1.2.3"


def test_uncopy_takes_back_only_the_rows_the_copy_wrote(journal):
    journal.ensure("/s/failed/a.dcm", ["orthanc"], sop="1.2.3")
    journal.update("/s/failed/a.dcm", "orthanc", state="failed", event="failed", detail="nope")
    assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t1")
    journal.uncopy("/s/sending/a.dcm", "t1")
    assert journal.rows("/s/sending/a.dcm") == {} and journal.history("/s/sending/a.dcm") == []
    assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t2")
    journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")  # the daemon adopted them: no longer the copy
    journal.update("/s/sending/a.dcm", "orthanc", state="delivered", event="delivered")
    journal.uncopy("/s/sending/a.dcm", "t2")
    assert journal.rows("/s/sending/a.dcm")["orthanc"].state == "delivered"
    assert journal.rows("/s/failed/a.dcm")["orthanc"].state == "failed"  # the original is never touched


def test_restore_writes_rows_back_without_counting_twice(journal):
    journal.set_health("orthanc", True)
    journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
    update = Update("/s/sending/a.dcm", "orthanc", "failed", "failed", "permanent: refused", 2, code=0xA900)
    journal.apply([update])
    journal.forget("/s/sending/a.dcm")
    journal.restore("/s/sending/a.dcm", "1.2.3", 5.0, [update])
    row = journal.rows("/s/sending/a.dcm")["orthanc"]
    assert (row.state, row.attempts, row.last_error, row.last_code, row.first_seen) == (
        "failed", 2, "permanent: refused", 0xA900, 5.0)
    assert journal.sop_of("/s/sending/a.dcm") == "1.2.3"
    assert journal.destinations()["orthanc"]["failed"] == 1
    assert "restored" in journal.history("/s/sending/a.dcm")[-1]["detail"]


def test_a_uid_conflict_is_counted_from_the_first_one_on_like_deliveries_and_failures(journal):
    """The counters' row is created by the first update that counts: the conflict must not come before it."""
    journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
    journal.apply([Update("/s/sending/a.dcm", "orthanc", "failed", "uid_conflict", "uid_conflict: earlier")])
    assert journal._exec("SELECT dest, failed, conflicts FROM destinations") == [("orthanc", 1, 1)]
