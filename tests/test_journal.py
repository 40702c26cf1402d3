"""What only the SQLite journal does: its in-place upgrade, its pruning pace, and its read-only view of an older file.

The behaviour every backend shares is in test_journal_contract.py."""

import os
import sqlite3
import time

import pytest

import relaypacsd.journal_sqlite
import relaypacsd.sqlite_instances
from relaypacsd.errors import JournalError
from relaypacsd.journal import Update, open_journal
from relaypacsd.journal_sqlite import SqliteJournal
from tests.helpers import OLD_SCHEMA


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
        j = SqliteJournal(path)
        assert j.rows("/s/sending/a.dcm")["orthanc"].state == "delivered"
        assert j.destinations()["orthanc"]["delivered"] == 7
        j.close()
    j = SqliteJournal(path)
    j.ensure("/s/sending/b.dcm", ["orthanc"], sop="1.2.4")
    j.apply([delivered("/s/sending/b.dcm", "1.2.4", "d1"),
             Update("/s/sending/a.dcm", "orthanc", "failed", "uid_conflict", "uid_conflict: x")])
    assert j.known_instances("orthanc", ["1.2.4"])["1.2.4"].digest == "d1"
    assert j._exec("SELECT conflicts FROM destinations") == [(1,)]
    assert j.rows("/s/sending/a.dcm")["orthanc"].route == ""  # the route column (#11) added, empty
    j.close()


def test_instances_older_than_the_memory_are_pruned_in_small_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(relaypacsd.sqlite_instances, "PRUNE_EVERY", 4)
    monkeypatch.setattr(relaypacsd.sqlite_instances, "PRUNE_STEP", 3)
    j = SqliteJournal(tmp_path / "journal.sqlite3", instance_days=1)
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


def test_a_read_only_journal_reads_an_older_file_without_upgrading_it(tmp_path):
    """`status` may look before any daemon of this version has run: no conflicts column yet, and it must not add one."""
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO destinations (dest, healthy, last_change, delivered) VALUES ('orthanc', 1, 1, 3)")
    db.execute("INSERT INTO deliveries (path, dest, sop, state, first_seen, updated) "
               "VALUES ('/s/sending/a.dcm', 'orthanc', '1.2.3', 'pending', 1, 1)")
    db.commit()
    db.close()
    j = open_journal(tmp_path, readonly=True)
    assert j.destinations()["orthanc"]["conflicts"] == 0 and j.destinations()["orthanc"]["delivered"] == 3
    assert j.counts() == {"orthanc": {"pending": 1}}
    # No route column yet (#11): rows read without one, and no route counted
    assert j.rows("/s/sending/a.dcm")["orthanc"].route == "" and j.route_counts() == {}
    j.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert "conflicts" not in {r[1] for r in db.execute("PRAGMA table_info(destinations)")}
    assert "route" not in {r[1] for r in db.execute("PRAGMA table_info(deliveries)")}
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'instances'").fetchall() == []
    db.close()


def test_a_missing_or_unreadable_journal_is_a_journal_error(tmp_path):
    with pytest.raises(JournalError):
        open_journal(tmp_path / "nowhere", readonly=True)
    (tmp_path / "journal.sqlite3").write_bytes(b"not a database, just bytes" * 100)
    j = open_journal(tmp_path, readonly=True)  # SQLite reads the header only at the first query
    try:
        with pytest.raises(JournalError):
            j.destinations()
    finally:
        j.close()


def _modes(folder):
    return {f.name: oct(f.stat().st_mode & 0o777) for f in folder.iterdir() if f.name.startswith("journal")}


def test_the_journal_is_created_0600_with_its_wal_and_shm_whatever_the_umask(tmp_path):
    """It holds PatientIDs (the delivery history): nobody but the service's user may read it."""
    old = os.umask(0o000)
    try:
        journal = open_journal(tmp_path / "state")
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")  # the WAL and its index now exist
        try:
            assert _modes(tmp_path / "state") == {"journal.sqlite3": "0o600", "journal.sqlite3-wal": "0o600",
                                                  "journal.sqlite3-shm": "0o600"}
        finally:
            journal.close()
    finally:
        os.umask(old)


def test_a_journal_an_older_release_left_readable_is_made_0600(tmp_path):
    journal = open_journal(tmp_path)
    journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
    for f in tmp_path.iterdir():
        f.chmod(0o644)
    reopened = open_journal(tmp_path)  # while the first still holds the WAL open
    try:
        assert set(_modes(tmp_path).values()) == {"0o600"}
    finally:
        reopened.close()
        journal.close()
