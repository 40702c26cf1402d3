"""The dashboard's application against a real daemon (scripted PACS): levels, login, CSRF, actions, secrets."""

from __future__ import annotations

import random
import time

import pytest

from relaypacsd.web import access as access_module
from relaypacsd.web.access import NO_USERS
from relaypacsd.web.sessions import COOKIE
from tests.dicomfactory import fresh
from tests.helpers import count, wait_until
from tests.web.conftest import PASSWORDS, client_for, login


def drop(daemon, name: str, refused: bool = False) -> str:
    """A fresh instance into the inbox (one the scripted PACS refuses when `refused`); its SOP UID."""
    ds = fresh()
    if refused:
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.{random.randrange(10**9)}.666"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    tmp = daemon.spools[0].root / f".{name}"
    ds.save_as(tmp, enforce_file_format=True)
    tmp.rename(daemon.spools[0].inbox / name)
    return str(ds.SOPInstanceUID)


def settled(daemon, sent: int, failed: int) -> None:
    spool = daemon.spools[0]
    assert wait_until(lambda: count(spool, "sent") == sent and count(spool, "failed") == failed, 20)


def test_without_users_the_overview_is_open_and_every_per_file_page_says_how_to_add_users(open_client, daemon):
    drop(daemon, "a.dcm")
    drop(daemon, "b.dcm", refused=True)
    settled(daemon, 1, 1)
    assert open_client.get("/").status_code == 200
    status = wait_until(lambda: (lambda s: s if s["watch"][0]["sent"] == 1 and s["watch"][0]["failed"] == 1 else None)(
        open_client.get("/api/status").json()), 5)
    assert status, open_client.get("/api/status").json()
    for path in ("/failed", "/config", "/api/failed", "/api/config"):
        r = open_client.get(path)
        assert r.status_code == 403 and "relaypacsd user add" in r.text, path
        assert "b.dcm" not in r.text
    r = open_client.post("/api/failed/retry", json={"all": True})
    assert r.status_code == 403 and r.json()["error"] == NO_USERS
    assert count(daemon.spools[0], "failed") == 1
    assert "b.dcm" not in open_client.get("/").text + open_client.get("/api/status").text


def test_the_status_document_has_the_shape_of_status_json_and_counts_what_the_folders_hold(open_client, daemon):
    for i in range(3):
        drop(daemon, f"ok{i}.dcm")
    drop(daemon, "bad.dcm", refused=True)
    settled(daemon, 3, 1)
    time.sleep(1.1)  # the document is cached for a second
    doc = open_client.get("/api/status").json()
    assert set(doc) >= {"daemon", "watch", "pacs"}
    root = doc["watch"][0]
    assert (root["inbox"], root["sending"], root["sent"], root["failed"]) == (0, 0, 3, 1)
    pacs = doc["pacs"][0]
    assert pacs["name"] == "orthanc" and pacs["health"] == "up" and pacs["delivered"] == 3 and pacs["failed"] == 1
    assert pacs["paused"] is False and doc["daemon"]["running"] is True
    # #14: every gateway of the spool, as `status --json` shows them (one here: this daemon on SQLite)
    # (each PACS as the node sees it comes with its heartbeat, every heartbeat_interval)
    assert [(n["name"], n["state"]) for n in doc["nodes"]] == [(daemon.config.node, "alive")]


def test_with_users_everything_but_healthz_and_the_login_needs_a_session(client):
    assert client.get("/").status_code == 303 and client.get("/").headers["location"].startswith("/login")
    for path in ("/api/status", "/api/charts", "/api/failed", "/api/config"):
        assert client.get(path).status_code == 401, path
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/login").status_code == 200


def test_the_session_cookie_is_httponly_and_samesite_and_no_answer_shows_the_session_or_a_hash(client, users_file):
    form = client.get("/login")
    import re

    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    r = client.post("/login", data={"name": "olga", "password": PASSWORDS["olga"], "csrf": token})
    assert r.status_code == 303
    header = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(COOKIE))
    assert "HttpOnly" in header and "SameSite=strict" in header and "Secure" not in header  # plain http here
    session_id = client.cookies.get(COOKIE)
    hashes = [line for line in users_file.read_text().split('"') if line.startswith("$argon2")]
    assert len(hashes) == 2
    for path in ("/", "/failed", "/config", "/api/status", "/api/session", "/api/config", "/api/failed"):
        text = client.get(path).text
        assert session_id not in text and not any(h in text for h in hashes), path
        assert PASSWORDS["olga"] not in text


def test_a_login_without_the_forms_csrf_token_is_refused(client):
    client.get("/login")
    r = client.post("/login", data={"name": "olga", "password": PASSWORDS["olga"], "csrf": "forged"})
    assert r.status_code == 403 and "CSRF" in r.text
    assert client.get("/api/status").status_code == 401


def test_a_failed_login_is_slow_and_after_five_the_name_is_locked_out_even_with_the_right_password(client, monkeypatch):
    import re

    def attempt(password: str):
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        return client.post("/login", data={"name": "olga", "password": password, "csrf": token})

    started = time.monotonic()
    r = attempt("wrong")
    assert r.status_code == 401 and "wrong user name or password" in r.text
    assert time.monotonic() - started >= access_module.FAIL_DELAY
    monkeypatch.setattr(access_module, "FAIL_DELAY", 0.0)
    for _ in range(4):
        assert attempt("wrong").status_code == 401
    r = attempt(PASSWORDS["olga"])
    assert r.status_code == 429 and "too many failed logins" in r.text
    assert client.get("/api/status").status_code == 401


def test_an_unknown_user_takes_as_long_as_a_wrong_password(client, monkeypatch):
    import re

    monkeypatch.setattr(access_module, "FAIL_DELAY", 0.0)

    def timed(name: str) -> float:
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        started = time.monotonic()
        assert client.post("/login", data={"name": name, "password": "x" * 12, "csrf": token}).status_code == 401
        return time.monotonic() - started

    known, unknown = min(timed("olga") for _ in range(2)), min(timed("nobody") for _ in range(2))
    assert unknown > known / 3  # both verify one argon2 hash


def test_an_operator_retries_a_failed_file_and_it_goes_out_again(client, daemon, pacs):
    uid = drop(daemon, "bad.dcm", refused=True)
    settled(daemon, 0, 1)
    csrf = login(client, "olga")
    files = client.get("/api/failed").json()
    assert files["total"] == 1
    f = files["files"][0]
    assert f["file"] == "bad.dcm" and f["stage"] == "delivery" and "0xa900" in f["code"].lower()
    assert "retry" in f["next_step"] and f["pacs"] == ["orthanc"]
    pacs.rule = lambda u, n, call: __import__("relaypacsd.outcomes").outcomes.Outcome.DELIVERED  # the cause is fixed
    r = client.post("/api/failed/retry", json={"ids": [f["id"]]}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    assert [q["id"] for q in r.json()["queued"]] == [f["id"]] and r.json()["queued"][0]["for"] == ["orthanc"]
    settled(daemon, 1, 0)
    assert pacs.received(uid) == 2


def test_every_post_without_the_sessions_csrf_token_is_refused(client, daemon):
    drop(daemon, "bad.dcm", refused=True)
    settled(daemon, 0, 1)
    login(client, "olga")
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        for path in ("/api/failed/retry", "/api/pacs/orthanc/pause"):
            r = client.post(path, json={"all": True}, headers=headers)
            assert r.status_code == 403 and "CSRF" in r.json()["error"], (path, headers)
    assert count(daemon.spools[0], "failed") == 1 and not daemon.engine.destinations["orthanc"].paused


def test_a_viewer_reads_the_failed_files_but_may_not_act(client, daemon):
    drop(daemon, "bad.dcm", refused=True)
    settled(daemon, 0, 1)
    csrf = login(client, "vic")
    assert client.get("/api/failed").json()["total"] == 1
    assert "Retry all" not in client.get("/failed").text
    r = client.post("/api/failed/retry", json={"all": True}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403 and "viewer" in r.json()["error"]
    assert count(daemon.spools[0], "failed") == 1


def test_retry_of_a_file_not_in_failed_is_refused_with_the_reason(client, daemon):
    csrf = login(client, "olga")
    for bad in ("0/nothing.dcm", "0/../sent/x.dcm", "7/a.dcm", "x"):
        r = client.post("/api/failed/retry", json={"ids": [bad]}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 409 and r.json()["errors"][0]["id"] == bad, bad
    assert client.post("/api/failed/retry", json={"ids": []}, headers={"X-CSRF-Token": csrf}).status_code == 400


def test_an_operator_pauses_and_resumes_a_pacs_and_its_files_wait_meanwhile(client, daemon, pacs, tmp_path):
    csrf = login(client, "olga")
    r = client.post("/api/pacs/orthanc/pause", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json() == {"name": "orthanc", "paused": True, "by": "olga"}
    assert client.post("/api/pacs/orthanc/pause", headers={"X-CSRF-Token": csrf}).status_code == 409
    assert client.post("/api/pacs/nope/pause", headers={"X-CSRF-Token": csrf}).status_code == 404
    drop(daemon, "held.dcm")
    assert wait_until(lambda: count(daemon.spools[0], "sending") == 1, 5)
    time.sleep(0.5)
    assert not pacs.calls and count(daemon.spools[0], "sent") == 0
    time.sleep(1.1)
    doc = client.get("/api/status").json()
    assert doc["pacs"][0]["paused"] is True and doc["pacs"][0]["paused_by"] == "olga"
    assert (tmp_path / "state" / "paused.json").exists()  # kept across restarts
    assert client.post("/api/pacs/orthanc/resume", headers={"X-CSRF-Token": csrf}).status_code == 200
    settled(daemon, 1, 0)
    from relaypacsd.history import HistoryQuery

    acts = [(r.outcome, r.user) for r in daemon.journal.find_history(HistoryQuery(pacs="orthanc"))
            if r.outcome in ("paused", "resumed")]
    assert acts == [("resumed", "olga"), ("paused", "olga")]  # in the history with who did them, newest first


def test_the_config_page_masks_every_secret(tmp_path, pacs, users_file):
    from relaypacsd.config import build_config
    from relaypacsd.daemon import Daemon
    from relaypacsd.tally import Tally

    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           "watch": [{"path": str(tmp_path / "root")}],
                           "pacs": {"orthanc": {"url": pacs.target, "username": "u", "password": "pw-s3cr3t-1",
                                                "token": "tok-s3cr3t-2"}}}, {})
    d = Daemon(config, senders={"orthanc": pacs})
    d.tally = Tally()
    d.start()
    try:
        with client_for(d, users_file) as c:
            login(c, "vic")
            for path in ("/config", "/api/config"):
                text = c.get(path).text
                assert "********" in text and "pw-s3cr3t-1" not in text and "tok-s3cr3t-2" not in text, path
    finally:
        d.shutdown()
        d.tally.join()


def test_pages_carry_a_policy_that_loads_nothing_from_elsewhere(open_client):
    r = open_client.get("/")
    assert "default-src 'self'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert "http://" not in r.text and "https://" not in r.text
    for asset in ("dashboard.js", "chart.js", "style.css"):
        body = open_client.get(f"/static/{asset}").text
        assert "https://" not in body.replace("http://www.w3.org/2000/svg", "")


def test_the_openapi_document_names_every_route(open_client):
    doc = open_client.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/api/status", "/api/failed", "/api/failed/retry", "/api/pacs/{name}/pause",
                 "/api/pacs/{name}/resume", "/healthz", "/api/charts", "/api/config"):
        assert path in doc["paths"], path


def test_the_login_goes_back_only_to_a_page_of_this_server(client):
    import re

    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login?next=//evil.example/x").text).group(1)
    r = client.post("/login?next=//evil.example/x", data={"name": "vic", "password": PASSWORDS["vic"], "csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/"


@pytest.mark.parametrize("path", ["/api/status"])
def test_a_removed_user_loses_its_session(client, users_file, path):
    from relaypacsd.web.users import read_users, write_users

    login(client, "vic")
    assert client.get(path).status_code == 200
    users = read_users(users_file)
    del users["vic"]
    time.sleep(0.01)
    write_users(users_file, users)
    assert client.get(path).status_code == 401


def test_the_delivered_chart_counts_every_instance_delivered_since_the_start(open_client, daemon):
    from relaypacsd.web import view as view_module

    for i in range(3):
        drop(daemon, f"c{i}.dcm")
    settled(daemon, 3, 0)
    time.sleep(view_module.SAMPLE_EVERY + 1)
    chart = open_client.get("/api/charts?span=hour").json()
    assert sum(v or 0 for v in chart["delivered"]["orthanc"]) == 3, chart


def test_the_history_answers_with_the_cli_filters_names_the_operator_of_a_retry_and_downloads_as_csv(client, daemon, pacs):
    from relaypacsd.outcomes import Outcome

    ok_uid = drop(daemon, "ok.dcm")
    drop(daemon, "bad.dcm", refused=True)
    settled(daemon, 1, 1)
    assert client.get("/api/history").status_code == 401
    csrf = login(client, "olga")
    records = client.get(f"/api/history?sop={ok_uid}").json()["records"]
    assert [(r["destination"], r["outcome"], r["file"]) for r in records] == [("orthanc", "delivered", "ok.dcm")]
    study = records[0]["study_instance_uid"]
    assert client.get(f"/api/history?study={study}&pacs=orthanc").json()["records"][0]["sop_instance_uid"] == ok_uid
    assert client.get("/api/history?study=not-a-uid").status_code == 400
    assert client.get("/api/history?since=yesterday").status_code == 400
    pacs.rule = lambda u, n, call: Outcome.DELIVERED
    f = client.get("/api/failed").json()["files"][0]
    assert client.post("/api/failed/retry", json={"ids": [f["id"]]}, headers={"X-CSRF-Token": csrf}).status_code == 200
    settled(daemon, 2, 0)
    requeued = client.get("/api/history?outcome=requeued").json()["records"]
    assert [(r["file"], r["user"]) for r in requeued] == [("bad.dcm", "olga")]
    csv = client.get("/api/history?file=bad.dcm&format=csv")
    assert csv.headers["content-type"].startswith("text/csv") and "attachment" in csv.headers["content-disposition"]
    lines = csv.text.split("\r\n")
    assert lines[0].startswith("time,") and any(",requeued," in line and ",olga" in line for line in lines)
    for page in ("/history", f"/timeline?study={study}", "/timeline?file=bad.dcm"):
        assert client.get(page).status_code == 200, page
    assert client.get("/timeline").status_code == 400


def test_without_users_the_history_and_timelines_need_a_login(open_client):
    for path in ("/history", "/timeline?study=1.2.3", "/api/history"):
        r = open_client.get(path)
        assert r.status_code == 403 and "relaypacsd user add" in r.text, path
