"""What only the PostgreSQL journal does: a password that never shows, reconnecting once the server is back,
a read-only view. The behaviour every backend shares is in test_journal_contract.py."""

from __future__ import annotations

import time

import pytest

from relaypacsd.config import Secret
from relaypacsd.errors import JournalError


@pytest.fixture(scope="module")
def locked_postgres():
    """A private server that wants a password (scram-sha-256)."""
    from tests.conftest import server_missing
    from tests.localpostgres import LocalPostgres, PostgresNotInstalled

    try:
        server = LocalPostgres(password="pg-t0p-secret")
    except PostgresNotInstalled as exc:
        server_missing("PostgreSQL", exc)
    try:
        server.init()
        yield server
    finally:
        server.destroy()


def test_the_password_opens_the_journal_and_a_wrong_one_is_refused_without_showing_it(locked_postgres):
    from relaypacsd.journal_pg import PgJournal

    journal = PgJournal(locked_postgres.url, Secret("pg-t0p-secret"))
    journal.set_health("orthanc", True)
    journal.close()
    with pytest.raises(JournalError) as exc:
        PgJournal(locked_postgres.url, Secret("wrong-pw-123"))
    text = str(exc.value)
    assert "password authentication failed" in text and "wrong-pw-123" not in text and "pg-t0p-secret" not in text
    assert text.startswith(locked_postgres.url) and "\n" not in text


def test_the_journal_reconnects_once_the_server_is_back(locked_postgres):
    from relaypacsd.journal_pg import PgJournal

    journal = PgJournal(locked_postgres.url, Secret("pg-t0p-secret"))
    try:
        journal.ensure("ct/sending/a.dcm", ["orthanc"], sop="1.2")
        locked_postgres.stop("immediate")
        with pytest.raises(JournalError) as exc:
            journal.rows("ct/sending/a.dcm")
        assert "pg-t0p-secret" not in str(exc.value)
        with pytest.raises(JournalError):  # still away: a quick refusal, not a hang
            journal.counts()
        locked_postgres.start()
        assert journal.rows("ct/sending/a.dcm")["orthanc"].state == "pending"  # nothing lost
    finally:
        journal.close()


def test_a_read_only_journal_writes_nothing(locked_postgres):
    from relaypacsd.journal_pg import PgJournal

    PgJournal(locked_postgres.url, Secret("pg-t0p-secret")).close()  # the schema
    looking = PgJournal(locked_postgres.url, Secret("pg-t0p-secret"), readonly=True)
    try:
        with pytest.raises(JournalError, match="read-only"):
            looking.set_health("orthanc", False, "x")
    finally:
        looking.close()


def test_schema_creation_that_deadlocks_with_a_running_node_is_tried_again():
    """ALTER TABLE ... IF NOT EXISTS takes the table's strongest lock: a running node upgrading its own lock
    deadlocks with it and PostgreSQL ends one. The starting node exited 2 (seen once in CI); it retries now."""
    import contextlib

    import psycopg.errors

    from relaypacsd.pg_db import PgDatabase

    class Conn:
        def __init__(self, fail: int):
            self.fail, self.ran = fail, []

        def transaction(self):
            return contextlib.nullcontext()

        def execute(self, sql, args=None):
            if sql.startswith("ALTER") and self.fail:
                self.fail -= 1
                raise psycopg.errors.DeadlockDetected("deadlock detected")
            self.ran.append(sql)

    db = PgDatabase.__new__(PgDatabase)  # only what _run needs of it: no server
    db.shown, db._password, db._conn = "postgresql://relaypacs@127.0.0.1/relaypacs", Secret(""), None
    conn = Conn(fail=2)
    schema = "CREATE TABLE t (a int); ALTER TABLE t ADD COLUMN IF NOT EXISTS b int"
    db._run(conn, lambda: PgDatabase._create(conn, schema))  # as __init__ runs it
    assert conn.ran[-1].startswith("ALTER") and conn.fail == 0
    always = Conn(fail=9)
    with pytest.raises(JournalError, match="deadlock detected"):
        db._run(always, lambda: PgDatabase._create(always, "ALTER TABLE t ADD COLUMN IF NOT EXISTS b int"))


def test_a_transaction_ended_to_break_a_deadlock_runs_again_and_commits(locked_postgres):
    """Two nodes lock the same rows in opposite orders; PostgreSQL ends one transaction to break the deadlock.
    Nothing of it was written, so it runs again. It was said as "journal cannot be reached" (test_gateways)."""
    import threading

    import psycopg

    from relaypacsd.pg_db import PgDatabase

    db = PgDatabase(locked_postgres.url, Secret("pg-t0p-secret"),
                    schema="CREATE TABLE IF NOT EXISTS locks_t (k int PRIMARY KEY, v int NOT NULL)")
    other = psycopg.connect(locked_postgres.url, password="pg-t0p-secret", autocommit=True)
    try:
        db.change("DELETE FROM locks_t")
        db.transaction([("INSERT INTO locks_t (k, v) VALUES (%s, %s)", (1, 0)),
                        ("INSERT INTO locks_t (k, v) VALUES (%s, %s)", (2, 0))])
        tx = other.transaction()
        tx.__enter__()
        other.execute("UPDATE locks_t SET v = 20 WHERE k = 2")  # the other node holds row 2
        done: list[object] = []

        def ours() -> None:  # row 1, then row 2: waits for the other node
            try:
                done.append(db.transaction([("UPDATE locks_t SET v = v + 1 WHERE k = %s", (1,)),
                                            ("UPDATE locks_t SET v = v + 1 WHERE k = %s", (2,))]))
            except Exception as exc:  # noqa: BLE001 - the test reports it
                done.append(exc)

        worker = threading.Thread(target=ours)
        worker.start()
        time.sleep(0.3)  # ours holds row 1 and waits for row 2
        other.execute("UPDATE locks_t SET v = 10 WHERE k = 1")  # the cycle: PostgreSQL ends ours (the older wait)
        tx.__exit__(None, None, None)  # the other node commits
        worker.join(30)
        assert done == [[]], done
        assert sorted(db.query("SELECT k, v FROM locks_t")) == [(1, 11), (2, 21)]  # ours ran once, after theirs
    finally:
        other.close()
        db.close()
