"""Fixtures of the dashboard's tests: a real daemon (scripted PACS) in tmp_path, and clients of its app."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from relaypacsd.outcomes import Outcome
from relaypacsd.tally import Tally
from relaypacsd.web.access import Access
from relaypacsd.web.app import build_app
from relaypacsd.web.users import User, Users, hash_password, write_users
from relaypacsd.web.view import DaemonView
from tests.helpers import ScriptedPacs, make_daemon

PASSWORDS = {"olga": "operator-password-1", "vic": "viewer-password-1"}


@pytest.fixture
def pacs() -> ScriptedPacs:
    """A PACS that refuses (permanently) every instance whose UID ends in .666."""
    return ScriptedPacs("orthanc", rule=lambda uid, n, call: Outcome.PERMANENT if uid.endswith(".666")
                        else Outcome.DELIVERED)


@pytest.fixture
def daemon(tmp_path: Path, pacs: ScriptedPacs) -> Iterator:
    d = make_daemon(tmp_path, pacs)
    d.tally = Tally()  # what _start_web does
    d.start()
    try:
        yield d
    finally:
        d.shutdown()
        d.tally.join()


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    write_users(path, {"olga": User("olga", "operator", hash_password(PASSWORDS["olga"])),
                       "vic": User("vic", "viewer", hash_password(PASSWORDS["vic"]))})
    return path


def client_for(daemon, users_file: Path | None) -> TestClient:
    access = Access(Users(users_file) if users_file else None, tls=False)
    return TestClient(build_app(DaemonView(daemon), access), base_url="http://127.0.0.1", follow_redirects=False)


@pytest.fixture
def open_client(daemon) -> Iterator[TestClient]:
    """The dashboard without users (read-only, loopback)."""
    with client_for(daemon, None) as c:
        yield c


@pytest.fixture
def client(daemon, users_file: Path) -> Iterator[TestClient]:
    """The dashboard with an operator (olga) and a viewer (vic)."""
    with client_for(daemon, users_file) as c:
        yield c


def login(client: TestClient, name: str, password: str | None = None) -> str:
    """Log in through the form; return the session's CSRF token (from the page)."""
    form = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    r = client.post("/login", data={"name": name, "password": password or PASSWORDS[name], "csrf": token})
    assert r.status_code == 303, r.text
    page = client.get("/")
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
