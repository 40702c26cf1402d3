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
