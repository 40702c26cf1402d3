"""The history in the SQLite journal: one commit with the answer, the indexes each lookup uses, older journals."""

from __future__ import annotations

import sqlite3

import pytest

from relaypacsd import history_sqlite
from relaypacsd.history import HistoryQuery, HistoryRecord
from relaypacsd.journal import Update, open_journal
from tests.helpers import OLD_SCHEMA


def test_an_answer_and_its_record_are_one_commit(tmp_path):
    """A record that cannot be written takes the answer's row back with it: never a state without its record."""
    journal = open_journal(tmp_path)
    try:
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
        broken = HistoryRecord(object())  # type: ignore[arg-type]  # SQLite cannot bind it
        with pytest.raises(sqlite3.Error):
            journal.apply([Update("/s/sending/a.dcm", "orthanc", "delivered", "delivered", record=broken)])
        assert journal.rows("/s/sending/a.dcm")["orthanc"].state == "pending"
        assert journal.history("/s/sending/a.dcm") == [] and journal.destinations() == {}
    finally:
        journal.close()


@pytest.mark.parametrize("field, index", [("study", "study"), ("patient", "patient"), ("accession", "accession"),
                                          ("sop", "sop"), ("file", "file"), ("pacs", "time"), ("outcome", "outcome"),
                                          (None, "time")])
def test_each_lookup_uses_its_index_and_never_sorts(tmp_path, field, index):
    """What keeps `history --study UID` fast with a million records (bench/history.py measures it)."""
    journal = open_journal(tmp_path)
    journal.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    sql, args = history_sqlite.select(HistoryQuery(**({field: "x"} if field else {})))
    plan = " ".join(str(row[-1]) for row in db.execute("EXPLAIN QUERY PLAN " + sql, args))
    db.close()
    assert f"INDEX {history_sqlite.TABLE}_{index}" in plan and "TEMP B-TREE" not in plan, plan


def test_a_read_only_look_at_a_journal_older_than_the_history_finds_nothing_and_changes_nothing(tmp_path):
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.close()
    journal = open_journal(tmp_path, readonly=True)
    try:
        assert journal.find_history(HistoryQuery(study="1.2.3")) == []
    finally:
        journal.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert db.execute("SELECT name FROM sqlite_master WHERE name = ?", (history_sqlite.TABLE,)).fetchall() == []
    db.close()
    journal = open_journal(tmp_path)  # the daemon's open adds it
    try:
        journal.record_history([HistoryRecord(1.0, file="a")])
        assert [r.file for r in journal.find_history(HistoryQuery())] == ["a"]
    finally:
        journal.close()


def test_the_columns_are_the_records_fields_and_no_patient_name(tmp_path):
    journal = open_journal(tmp_path)
    journal.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    columns = [r[1] for r in db.execute(f"PRAGMA table_info({history_sqlite.TABLE})")]
    db.close()
    assert columns == ["id", *history_sqlite.COLUMNS] and not [c for c in columns if "name" in c]
