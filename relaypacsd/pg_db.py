"""One PostgreSQL connection shared by threads (as sqlite_db.Database is for SQLite): connecting and reconnecting,
queries, transactions sent as one message; every error a JournalError whose text holds no password.

psycopg 3 (`psycopg[binary]`): the maintained driver, with client-side binding (a batch's commit is one
message, one round trip) and libpq's own timeouts. The connection is made again at the next call after the
server went away.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from relaypacsd.config import MASK, Secret
from relaypacsd.errors import JournalBusy, JournalError, LeaseLost

Statement = tuple[str, tuple[Any, ...]]

CONNECT_TIMEOUT = 5  # seconds; also the longest a call waits for a server that is away
# A server that vanished mid-query (a host gone, a network cut) is given up after this many ms of unanswered
# data, and idle connections are probed: a thread never hangs on a dead socket holding the journal's lock.
TCP_USER_TIMEOUT_MS = 15000
STATEMENT_TIMEOUT_MS = 30000
# Our transactions are sent whole and never wait on anything: one idle this long belongs to a node that was
# paused (SIGSTOP, a frozen VM) in the middle of it. PostgreSQL ends it, so its locks hold no other node up.
IDLE_IN_TRANSACTION_MS = 2000
DEADLOCK_TRIES = 5  # a transaction PostgreSQL ended to break a deadlock runs again, up to this many times in all
SCHEMA_LOCK = 0x72656c6179  # pg_advisory_xact_lock key: nodes starting together create the schema once


def masked_url(url: str) -> str:
    """The URL as logs may show it: a password, were one in it, masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable journal.url)"
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{MASK}@{host}"))


class PgDatabase:
    """A connection used by several threads under one lock, opened again when the server comes back."""

    def __init__(self, url: str, password: Secret, *, readonly: bool = False, schema: str = "",
                 application: str = "relaypacsd"):
        self.url, self.shown = url, masked_url(url)
        self._password = password
        self.readonly, self.application = readonly, application
        self.lock = threading.Lock()
        self._conn: Any = None
        self._closed = False
        with self.lock:
            conn = self._connection()
            if schema and not readonly:
                self._run(conn, lambda: self._create(conn, schema))

    def _connection(self) -> Any:
        """The open connection, or a new one (under the lock)."""
        import psycopg

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._closed:
            raise JournalError(f"{self.shown}: the journal is closed")
        self._drop()
        options = f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
        if self.readonly:
            options += " -c default_transaction_read_only=on"
        try:
            self._conn = psycopg.connect(self.url, password=self._password.reveal() or None, autocommit=True,
                                         connect_timeout=CONNECT_TIMEOUT, application_name=self.application,
                                         keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                                         tcp_user_timeout=TCP_USER_TIMEOUT_MS, options=options)
        except psycopg.Error as exc:
            raise JournalError(f"{self.shown}: {self._reason(exc)}") from None
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # a broken connection may fail to close: it is dropped either way
                pass
            self._conn = None

    def _reason(self, exc: BaseException) -> str:
        """libpq's message on one line, without the password should a server echo it."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        secret = self._password.reveal()
        return text.replace(secret, MASK) if secret else text

    def _run(self, conn: Any, work: Any) -> Any:
        import psycopg
        import psycopg.errors

        attempt = 0
        while True:
            try:
                return work()
            except LeaseLost:
                raise
            except psycopg.errors.DeadlockDetected as exc:
                # Two nodes' transactions locked the same rows (owners, deliveries) in opposite orders, and
                # PostgreSQL rolled this one back: nothing of it was written, so it runs again, a moment later.
                # Said as "cannot be reached", it told the technician of an outage there was not.
                attempt += 1
                if attempt < DEADLOCK_TRIES:
                    time.sleep(0.05 * attempt)
                    continue
                self._drop()
                raise JournalError(f"{self.shown}: {self._reason(exc)}") from None
            except psycopg.errors.LockNotAvailable as exc:
                raise JournalBusy(f"{self.shown}: {self._reason(exc)}") from None
            except psycopg.Error as exc:
                if conn.broken or conn.closed or isinstance(exc, psycopg.OperationalError):
                    self._drop()  # the next call connects again
                raise JournalError(f"{self.shown}: {self._reason(exc)}") from None

    @staticmethod
    def _create(conn: Any, schema: str) -> None:
        # ALTER TABLE takes its table's strongest lock even when there is nothing to add: a node already running
        # that upgrades its own lock on the table meanwhile deadlocks with it. `_run` runs it again then.
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in (s.strip() for s in schema.split(";")):
                if statement:
                    conn.execute(statement)

    def close(self) -> None:
        """Close the connection; later calls fail."""
        with self.lock:
            self._closed = True
            self._drop()

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows."""
        with self.lock:
            conn = self._connection()
            return self._run(conn, lambda: conn.execute(sql, tuple(args)).fetchall())

    def change(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run one statement on its own and return how many rows it changed."""
        with self.lock:
            conn = self._connection()
            return self._run(conn, lambda: conn.execute(sql, tuple(args)).rowcount)

    def transaction(self, statements: list[Statement], guard: Statement | None = None) -> list[tuple[Any, ...]]:
        """Run statements in one transaction, sent as one message; return the last one's rows (RETURNING).
        A `guard` that finds no row (its FOR SHARE lock holds a takeover off until the commit) means LeaseLost.

        One simple-protocol message, not a pipeline: a client paused mid-pipeline leaves its session "active",
        where no idle-in-transaction timeout ends it, holding its locks for as long as it is paused."""
        if not statements:
            return []
        import psycopg

        with self.lock:
            conn = self._connection()

            def work() -> list[tuple[Any, ...]]:
                with conn.transaction():
                    if guard is not None:
                        if not conn.execute(guard[0] + " FOR SHARE", guard[1]).fetchall():
                            raise LeaseLost(f"{self.shown}: this node was taken over by another one")
                    cur = psycopg.ClientCursor(conn)
                    cur.execute("; ".join(cur.mogrify(sql, args) for sql, args in statements))
                    rows = cur.fetchall() if cur.description is not None else []
                    while cur.nextset():
                        rows = cur.fetchall() if cur.description is not None else []
                    return rows

            return self._run(conn, work)

    def has_column(self, table: str, column: str) -> bool:
        """Whether `table` has `column` (a journal opened read-only may be older than this code)."""
        return bool(self.query("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                               "AND table_name = %s AND column_name = %s", (table, column)))
