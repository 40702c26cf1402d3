"""Suite-wide fixtures: no test may leave a thread running behind it; the canned HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.canned_http import CannedServer


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (workers, observers, schedulers must all be stopped)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {sorted(t.name for t in leaked)}"


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    """A local HTTP server with canned answers, for the tests of http.py and dicomweb.py."""
    server = CannedServer().start()
    try:
        yield server
    finally:
        server.stop()


def server_missing(what: str, error: Exception) -> None:
    """A real server the test needs is not installed: FAIL under CI (a skipped suite must never look green)."""
    import os

    message = f"real {what} unavailable: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres() -> Iterator["LocalPostgres"]:
    """One private PostgreSQL for the session (trust auth, 127.0.0.1 only); tests reset it as they need."""
    from tests.localpostgres import LocalPostgres, PostgresNotInstalled

    try:
        server = LocalPostgres()
    except PostgresNotInstalled as exc:
        server_missing("PostgreSQL", exc)
    try:
        server.init()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def clean_postgres(postgres: "LocalPostgres") -> "LocalPostgres":
    """The session PostgreSQL with no tables: a new journal."""
    postgres.reset()
    return postgres


if False:  # typing only
    from tests.localpostgres import LocalPostgres  # noqa: F401
