"""The shared SQLite connection: transactions (runs of one statement in one call), look-and-write transactions,
IN lists."""

import sqlite3

import pytest

from relaypacsd.sqlite_db import Database, in_lists

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


@pytest.fixture
def db(tmp_path):
    d = Database(tmp_path / "j.db", SCHEMA, [])
    yield d
    d.close()


def test_a_run_of_one_statement_writes_every_row_and_the_last_statement_returns_its_rows(db):
    insert = "INSERT INTO t (k, v) VALUES (?, ?)"
    rows = db.transaction([(insert, (f"k{i}", i)) for i in range(5)]
                          + [("UPDATE t SET v = v + 10 WHERE k = ? RETURNING v", ("k1",))])
    assert rows == [(11,)]
    assert db.query("SELECT k, v FROM t ORDER BY k") == [("k0", 0), ("k1", 11), ("k2", 2), ("k3", 3), ("k4", 4)]
    returned = db.transaction([("UPDATE t SET v = v + 1 WHERE k = ? RETURNING k", (k,)) for k in ("k2", "k3")])
    assert returned == [("k3",)]  # a run with RETURNING is run statement by statement: the last one's rows
    assert db.transaction([("SELECT v FROM t WHERE k = ?", (k,)) for k in ("k0", "k4")]) == [(4,)]


def test_a_failing_row_in_a_run_rolls_back_the_whole_transaction(db):
    insert = "INSERT INTO t (k, v) VALUES (?, ?)"
    db.transaction([(insert, ("a", 1))])
    with pytest.raises(sqlite3.IntegrityError):
        db.transaction([("UPDATE t SET v = 2 WHERE k = ?", ("a",)), (insert, ("b", 1)), (insert, ("a", 1))])
    assert db.query("SELECT k, v FROM t") == [("a", 1)]


def test_write_looks_and_writes_in_one_transaction_and_rolls_back_on_error(db):
    def step(run):
        have = {r[0] for r in run("SELECT k FROM t", ())}
        run("INSERT INTO t (k, v) VALUES (?, ?)", ("x", len(have)))
        return have

    assert db.write(step) == set()
    with pytest.raises(sqlite3.IntegrityError):  # x is there: the look was taken, the write fails, none of it stays
        db.write(step)
    assert db.query("SELECT k, v FROM t") == [("x", 0)]


def test_in_lists_slices_values_with_their_placeholders():
    assert list(in_lists([], 3)) == []
    assert list(in_lists(["a", "b", "c", "d"], 3)) == [("?,?,?", ["a", "b", "c"]), ("?", ["d"])]
    assert list(in_lists(("a", "b"), 2)) == [("?,?", ("a", "b"))]
