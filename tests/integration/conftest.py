"""Fixtures of the integration suite: real, private, loopback-only Orthanc servers, and rsyslog (audit)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relaypacsd.localorthanc import LocalOrthanc, OrthancNotInstalled
from tests.integration.rsyslog_helpers import LocalRsyslog, RsyslogNotInstalled, make_certificates

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as `integration`."""
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _not_installed(error: Exception, what: str = "Orthanc") -> None:
    # A skipped integration suite must never look green in CI.
    message = f"real {what} unavailable: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    """One Orthanc for the whole session, basic auth on (user "relaypacs", random password)."""
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc"), username="relaypacs")
    try:
        server.start()
    except OrthancNotInstalled as e:
        _not_installed(e)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_orthanc(orthanc: LocalOrthanc) -> LocalOrthanc:
    """The session Orthanc, emptied before the test."""
    orthanc.reset()
    return orthanc


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LocalOrthanc]]:
    """Start extra Orthanc servers: factory(**LocalOrthanc kwargs); all killed at teardown.

    Teardown does not wait for a graceful stop: Orthanc 1.10 always needs ~3.5 s for one, and the data is throwaway.
    """
    started: list[LocalOrthanc] = []

    def factory(**kwargs: Any) -> LocalOrthanc:
        server = LocalOrthanc(tmp_path_factory.mktemp("orthanc-extra"), **kwargs)
        try:
            server.start()
        except OrthancNotInstalled as e:
            _not_installed(e)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop(timeout=0)


@pytest.fixture(scope="session")
def rsyslog_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA, server and client certificates of every rsyslog in the session (made once)."""
    certs = tmp_path_factory.mktemp("rsyslog-certs")
    try:
        make_certificates(certs)
    except RsyslogNotInstalled as e:
        _not_installed(e, "rsyslog")
    return certs


@pytest.fixture
def rsyslog(tmp_path_factory: pytest.TempPathFactory, rsyslog_certs: Path) -> Iterator[LocalRsyslog]:
    """A private rsyslogd on loopback (TCP, UDP, TLS and mutual-TLS inputs), the audit repository of one test."""
    server = LocalRsyslog(tmp_path_factory.mktemp("rsyslog"), rsyslog_certs)
    try:
        server.start()
    except RsyslogNotInstalled as e:
        _not_installed(e, "rsyslog")
    try:
        yield server
    finally:
        server.stop()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _no_browser(message: str) -> None:
    # Like the Orthanc fixtures: a dashboard suite that did not run must never look green in CI.
    _not_installed(RuntimeError(f"{message} (apt-get install chromium chromium-driver)"), "headless Chromium")


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by selenium through Debian's chromedriver (no download of either)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _no_browser(f"{path} is missing")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _no_browser(str(exc))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,1000", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
