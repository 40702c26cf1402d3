"""One SQLite database file shared by threads: opening (WAL, schema, in-place upgrade), queries, transactions."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from relaypacsd.errors import JournalError, LeaseLost

Statement = tuple[str, tuple[Any, ...]]
Run = Callable[[str, Iterable[Any]], list[tuple[Any, ...]]]  # one statement in a `write`: its rows
T = TypeVar("T")


def in_lists(values: Sequence[Any], size: int) -> Iterator[tuple[str, Sequence[Any]]]:
    """`values` in slices of `size` for `IN (...)` (SQLite limits a statement's parameters): each slice with
    its placeholders ('?,?,?')."""
    for i in range(0, len(values), size):
        chunk = values[i:i + size]
        yield ",".join("?" * len(chunk)), chunk


class Database:
    """A connection used by several threads under one lock; every error becomes a JournalError."""

    def __init__(self, path: Path, schema: str, added_columns: list[tuple[str, str, str]], *, readonly: bool = False,
                 indexes: str = ""):
        self.path = path
        self.lock = threading.Lock()
        try:
            self.db = self._open_readonly() if readonly else self._open(schema, added_columns, indexes)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(str(exc)) from exc

    def _open(self, schema: str, added_columns: list[tuple[str, str, str]], indexes: str) -> sqlite3.Connection:
        """Open for the daemon: create the database or upgrade an older one in place (`indexes` once the added
        columns are there: an index may cover them)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _private(self.path)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only an OS crash may lose the last commits,
        # and then the files are simply sent again.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
        _add_columns(db, added_columns)
        if indexes:
            db.executescript(indexes)
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        """Open to look only (WAL lets a command read while the daemon writes): no schema, no upgrade."""
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None,
                               timeout=5)

    def close(self) -> None:
        """Close the database."""
        with self.lock:
            self.db.close()

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows."""
        with self.lock:
            try:
                return self.db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: {exc}") from exc

    def change(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run one statement on its own and return how many rows it changed."""
        with self.lock:
            try:
                return self.db.execute(sql, tuple(args)).rowcount
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: {exc}") from exc

    def transaction(self, statements: list[Statement], guard: Statement | None = None) -> list[tuple[Any, ...]]:
        """Run statements in one transaction: all or nothing; return the last one's rows (RETURNING).
        A `guard` that finds no row (a node fenced out: relaypacsd.nodes_book) rolls back with LeaseLost."""
        rows: list[tuple[Any, ...]] = []
        with self.lock:
            self.db.execute("BEGIN")
            try:
                if guard is not None and not self.db.execute(*guard).fetchall():
                    raise LeaseLost(f"{self.path}: this node was taken over by another one")
                i, n = 0, len(statements)
                while i < n:
                    sql, args = statements[i]
                    j = i + 1
                    while j < n and statements[j][0] == sql:  # a run of the same statement (a group's rows): one call
                        j += 1
                    if j - i > 1 and not sql.lstrip().upper().startswith("SELECT") and "RETURNING" not in sql.upper():
                        self.db.executemany(sql, [a for _, a in statements[i:j]])
                        rows = []
                    else:
                        for sql, args in statements[i:j]:
                            rows = self.db.execute(sql, args).fetchall()
                    i = j
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return rows

    def write(self, step: Callable[[Run], T]) -> T:
        """Run `step` in one write transaction (BEGIN IMMEDIATE: its reads and writes see no other writer's
        commit in between); `step` runs statements with the function it is given. All or nothing."""
        def run(sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
            return self.db.execute(sql, tuple(args)).fetchall()

        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = step(run)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return result

    def has_column(self, table: str, column: str) -> bool:
        """Whether `table` has `column` (a journal opened read-only may be older than this code)."""
        return column in {r[1] for r in self.query(f"PRAGMA table_info({table})")}


def _private(path: Path) -> None:
    """Create the database file 0600 (it holds PatientIDs; SQLite gives its -wal and -shm files the database's
    mode), and take group and other access away from one an older release created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        try:
            if os.stat(f"{path}{suffix}").st_mode & 0o077:
                os.chmod(f"{path}{suffix}", 0o600)
        except FileNotFoundError:
            pass


def _add_columns(db: sqlite3.Connection, added_columns: list[tuple[str, str, str]]) -> None:
    """Upgrade an older journal in place: add the columns it lacks (SQLite has no ADD COLUMN IF NOT EXISTS)."""
    for table, column, definition in added_columns:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if column in have:
            continue
        try:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process (a command) added it just now
                raise
