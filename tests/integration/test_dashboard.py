"""The dashboard in a real browser (Debian's headless Chromium), served by a real daemon that forwards to a
real Orthanc: the figures match the folders, a refused file is found, its cause fixed at the PACS and retried
from the page, a PACS paused and resumed; logins, roles, CSRF and the read-only mode. Saves docs/dashboard.png."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pydicom

from relaypacsd.localorthanc import free_port
from relaypacsd.web.users import User, hash_password, write_users
from tests.dicomfactory import write_instance, write_study
from tests.integration.daemon_helpers import (count_in, daemon_env, daemon_log, files_in, start_daemon, stop_daemon,
                                              wait_for, wait_ready, write_config)

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
PASSWORDS = {"olga": "olga-operator-pw", "vic": "vic-viewer-pw-1"}


def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "web-users.json"
    write_users(path, {"olga": User("olga", "operator", hash_password(PASSWORDS["olga"])),
                       "vic": User("vic", "viewer", hash_password(PASSWORDS["vic"]))})
    return path


def start(tmp_path: Path, orthanc, users: Path | None = None):
    port = free_port()
    web = {"port": port, "address": "127.0.0.1", **({"users_file": str(users)} if users else {})}
    cfg = write_config(tmp_path, orthanc, web=web)
    proc = start_daemon(cfg)
    wait_ready(proc)
    return proc, f"http://127.0.0.1:{port}", cfg


def drop(src: Path, inbox: Path) -> None:
    tmp = inbox.parent / f"staging-{src.name}"
    shutil.copy(src, tmp)
    tmp.rename(inbox / src.name)


def until(driver, check: Callable[[], object], timeout: float = 30, what: str = "") -> object:
    """Poll the page until check() is truthy (a stale element or a missing one counts as not yet)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def probe() -> object:
        try:
            return check()
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    return wait_for(probe, timeout, 0.2, message=lambda: f"{what}\n{driver.page_source[-3000:]}")


def cell(driver, row: str, field: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'{row} [data-field="{field}"]').text


def log_in(driver, url: str, name: str, password: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password or PASSWORDS[name])
    driver.find_element(By.ID, "login").click()
    # The answer must be in before the next navigation, or that one cancels the login's POST.
    until(driver, lambda: driver.find_elements(By.ID, "who") or driver.find_elements(By.ID, "login-error"),
          what="the login's answer")


def post_from_page(driver, path: str, csrf: bool) -> dict:
    """A POST from the page's own script, with or without the session's CSRF token."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const headers = {"Content-Type": "application/json"};
        if (arguments[1]) headers["X-CSRF-Token"] = document.querySelector('meta[name="csrf-token"]').content;
        fetch(arguments[0], {method: "POST", headers: headers, body: JSON.stringify({all: true})})
          .then(r => r.json().then(b => done({status: r.status, body: b})));
    """, path, csrf)


def test_the_read_only_overview_shows_what_the_folders_hold_and_nothing_per_file(tmp_path, clean_orthanc, browser):
    from selenium.webdriver.common.by import By

    spool = tmp_path / "spool"
    _, sops = write_study(tmp_path / "staging", 6)
    (tmp_path / "junk.dcm").write_text("not DICOM at all")
    proc, url, _ = start(tmp_path, clean_orthanc)
    try:
        for f in sorted((tmp_path / "staging").iterdir()):
            drop(f, spool / "inbox")
        drop(tmp_path / "junk.dcm", spool / "inbox")
        wait_for(lambda: count_in(spool, "sent") == 6 and count_in(spool, "failed") == 1, 60,
                 message=lambda: daemon_log(proc)[-3000:])
        browser.get(url + "/")
        row = f'tr[data-root="{spool}"]'
        until(browser, lambda: cell(browser, row, "sent") == "6" and cell(browser, row, "failed") == "1",
              what="the overview's counts")
        assert [cell(browser, row, f) for f in ("inbox", "sending", "sent", "failed")] == [
            str(count_in(spool, f)) for f in ("inbox", "sending", "sent", "failed")]
        pacs = 'tr[data-pacs="orthanc"]'
        until(browser, lambda: cell(browser, pacs, "health").startswith("up") and cell(browser, pacs, "delivered") == "6",
              what="the PACS row")
        assert cell(browser, pacs, "waiting") == "0" and set(sops) <= clean_orthanc.list_instance_uids()
        # #14: the spool's gateways (this one), with its view of the PACS once its heartbeat brought it
        node = f'tr[data-node="{socket.gethostname()}"]'
        until(browser, lambda: cell(browser, node, "state") == "alive" and "orthanc up" in cell(browser, node, "pacs"),
              what="the gateway's row")
        assert browser.find_element(By.ID, "read-only").text == "read-only"
        assert "junk.dcm" not in browser.page_source
        browser.get(url + "/failed")
        message = browser.find_element(By.ID, "message").text
        assert "relaypacsd user add" in message and "junk.dcm" not in browser.page_source
    finally:
        assert stop_daemon(proc) == 0


def test_an_operator_finds_a_refused_file_fixes_the_cause_at_the_pacs_and_retries_it(tmp_path, clean_orthanc, browser):
    from selenium.webdriver.common.by import By

    spool, staging = tmp_path / "spool", tmp_path / "staging"
    a = staging / "a.dcm"
    sop = write_instance(a)
    b = staging / "b.dcm"
    ds = pydicom.dcmread(a)
    ds.PatientName = "CORRECTED^NAME"  # the same SOPInstanceUID with other bytes: the PACS keeps the first
    ds.save_as(b, enforce_file_format=True)
    _, more = write_study(staging / "more", 8)
    proc, url, cfg = start(tmp_path, clean_orthanc, users_file(tmp_path))
    try:
        for f in sorted((staging / "more").iterdir()):
            drop(f, spool / "inbox")
        drop(a, spool / "inbox")
        wait_for(lambda: count_in(spool, "sent") == 9, 60, message=lambda: daemon_log(proc)[-3000:])
        drop(b, spool / "inbox")
        wait_for(lambda: [p.name for p in files_in(spool, "failed")] == ["b.dcm"], 60,
                 message=lambda: daemon_log(proc)[-3000:])

        browser.get(url + "/failed")
        assert "/login" in browser.current_url  # with users, every page needs a login
        log_in(browser, url, "olga")
        browser.get(url + "/failed")
        row = 'tr[data-id="0/b.dcm"]'
        until(browser, lambda: cell(browser, row, "file") == "b.dcm", what="the failed file")
        assert cell(browser, row, "stage") == "delivery"
        assert "conflict" in cell(browser, row, "reason").lower() and "SOPInstanceUID" in cell(browser, row, "next_step")
        search = browser.find_element(By.ID, "q")
        search.send_keys("no-such-file")
        until(browser, lambda: "no failed file matches" in browser.find_element(By.ID, "failed").text)
        search.clear()
        search.send_keys("b.d")
        until(browser, lambda: cell(browser, row, "file") == "b.dcm", what="the search")

        # The fix the sidecar names: delete the earlier instance at the PACS, then retry.
        (found,) = clean_orthanc.rest("POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop}})
        clean_orthanc.rest("DELETE", f"/instances/{found}")
        browser.find_element(By.CSS_SELECTOR, f'{row} button[data-action="retry"]').click()
        until(browser, lambda: "1 file(s) back in sending/" in browser.find_element(By.ID, "notice").text)
        wait_for(lambda: "b.dcm" in [p.name for p in files_in(spool, "sent")], 60,
                 message=lambda: daemon_log(proc)[-3000:])
        (found,) = clean_orthanc.rest("POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop}})
        assert clean_orthanc.rest("GET", f"/instances/{found}/simplified-tags")["PatientName"] == "CORRECTED^NAME"
        until(browser, lambda: "no file in failed/" in browser.find_element(By.ID, "failed").text)
        assert "dashboard: olga put 1 failed file(s) back into sending/" in daemon_log(proc)

        # The history says who retried it, and the study's timeline where each instance is now.
        browser.get(url + "/history?file=b.dcm")
        until(browser, lambda: "olga" in [td.text for td in browser.find_elements(By.CSS_SELECTOR, '#history [data-field="user"]')],
              what="the requeue in the history")
        outcomes = [td.text for td in browser.find_elements(By.CSS_SELECTOR, '#history [data-field="outcome"]')]
        assert {"uid_conflict", "requeued", "delivered"} <= set(outcomes), outcomes
        browser.find_element(By.CSS_SELECTOR, '#history [data-field="study"] a').click()
        until(browser, lambda: cell(browser, '#summary tr[data-pacs="orthanc"]', "outcomes") == "1 delivered",
              what="the study's timeline")

        # Pause: files wait; `status` says so; resume: they go.
        browser.get(url + "/")
        pacs = 'tr[data-pacs="orthanc"]'
        until(browser, lambda: browser.find_element(By.CSS_SELECTOR, f'{pacs} button[data-action="pause"]')).click()
        until(browser, lambda: "paused by olga" in cell(browser, pacs, "health"), what="paused")
        status = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "status", "--json"],
                                capture_output=True, text=True, env=daemon_env(), timeout=60)
        assert json.loads(status.stdout)["pacs"][0]["paused_by"] == "olga"
        c = staging / "c.dcm"
        write_instance(c)
        drop(c, spool / "inbox")
        wait_for(lambda: count_in(spool, "sending") == 1, 20)
        row = f'tr[data-root="{spool}"]'
        until(browser, lambda: cell(browser, row, "sending") == "1" and cell(browser, pacs, "waiting") == "1",
              what="one file waiting")
        assert count_in(spool, "sent") == 10
        browser.find_element(By.CSS_SELECTOR, f'{pacs} button[data-action="resume"]').click()
        wait_for(lambda: count_in(spool, "sent") == 11, 30, message=lambda: daemon_log(proc)[-3000:])
        until(browser, lambda: cell(browser, row, "sent") == "11" and cell(browser, row, "sending") == "0"
              and "paused" not in cell(browser, pacs, "health"), what="after the resume")
        # The charts have their samples (one every 10 s): the overview as the README shows it.
        until(browser, lambda: sum(float(c.get_attribute("data-value")) for c in browser.find_elements(
            By.CSS_SELECTOR, '#chart-delivered circle[data-series="orthanc"]')) == 11, 40,
            what=str([c.get_attribute("data-value") for c in browser.find_elements(By.CSS_SELECTOR, "#chart-delivered circle")]))
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
    finally:
        assert stop_daemon(proc) == 0


def test_logins_roles_and_csrf_in_the_browser(tmp_path, clean_orthanc, browser):
    from selenium.webdriver.common.by import By

    spool = tmp_path / "spool"
    (tmp_path / "junk.dcm").write_text("not DICOM")
    proc, url, _ = start(tmp_path, clean_orthanc, users_file(tmp_path))
    try:
        drop(tmp_path / "junk.dcm", spool / "inbox")
        wait_for(lambda: count_in(spool, "failed") == 1, 30)
        log_in(browser, url, "olga", "wrong-password")
        assert "wrong user name or password" in browser.find_element(By.ID, "login-error").text

        log_in(browser, url, "vic")
        cookie = browser.get_cookie("relaypacs_session")
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        browser.get(url + "/failed")
        until(browser, lambda: cell(browser, 'tr[data-id="0/junk.dcm"]', "stage") == "validation")
        assert not browser.find_elements(By.ID, "retry-all") and not browser.find_elements(By.CSS_SELECTOR, "button[data-action]")
        refused = post_from_page(browser, "/api/failed/retry", csrf=True)
        assert refused["status"] == 403 and "viewer" in refused["body"]["error"]
        browser.find_element(By.ID, "logout").click()

        log_in(browser, url, "olga")
        browser.get(url + "/failed")
        until(browser, lambda: browser.find_element(By.ID, "retry-all"))
        refused = post_from_page(browser, "/api/failed/retry", csrf=False)
        assert refused["status"] == 403 and "CSRF" in refused["body"]["error"]
        assert count_in(spool, "failed") == 1
        browser.get(url + "/config")
        text = browser.find_element(By.ID, "config").text
        assert 'password = "********"' in text and clean_orthanc.password not in browser.page_source
        assert cookie["value"] not in browser.page_source
    finally:
        assert stop_daemon(proc) == 0
    assert clean_orthanc.password not in daemon_log(proc) and PASSWORDS["olga"] not in daemon_log(proc)
    assert not re.search(re.escape(cookie["value"]), daemon_log(proc))


def test_the_demo_turns_the_dashboard_on_and_prints_its_address_and_login(tmp_path, clean_orthanc):
    import os
    import signal
    import time

    import requests

    user, password = clean_orthanc.auth
    env = daemon_env({"ORTHANC_URL": clean_orthanc.url, "ORTHANC_USERNAME": user, "ORTHANC_PASSWORD": password})
    log = open(tmp_path / "demo.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "relaypacsd", "demo", "--dir", str(tmp_path / "demo")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        text = lambda: (tmp_path / "demo.log").read_text(errors="replace")  # noqa: E731
        wait_for(lambda: "Dashboard:" in text() or proc.poll() is not None, 60, message=text)
        url = re.search(r"Dashboard: +(http://127\.0\.0\.1:\d+/)", text()).group(1)
        pw_file = tmp_path / "demo" / "web-password"
        assert f"password in {pw_file}" in text() and pw_file.read_text().strip() not in text()
        assert oct(os.stat(pw_file).st_mode & 0o777) == "0o600"
        s = requests.Session()
        token = re.search(r'name="csrf" value="([^"]+)"', s.get(url + "login", timeout=10).text).group(1)
        r = s.post(url + "login", data={"name": "demo", "password": pw_file.read_text().strip(), "csrf": token},
                   allow_redirects=False, timeout=10)
        assert r.status_code == 303
        deadline = time.monotonic() + 10
        while s.get(url + "api/status", timeout=10).json()["gateway"]["ready"] is not True:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
