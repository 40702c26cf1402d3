"""relaypacsd.http: auth (Basic, bearer, OAuth2 client credentials), TLS settings, retries, warnings.

The peers are a local ThreadingHTTPServer with canned answers (tests/canned_http.py, also used by
test_dicomweb.py): a real PACS will not give a 401 for an expired token on demand.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from loguru import logger

from relaypacsd.config import PacsConfig, Secret
from relaypacsd.errors import DestinationProblem
from relaypacsd.http import BasicAuth, BearerAuth, OAuth2ClientCredentials, make_auth, make_session, tls_settings
from tests.canned_http import PASSWORD, Answer, CannedServer, OAuthServer, Received


Responder = Callable[[Received], Answer]


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Everything loguru logs during the test (formatted messages)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{level} {message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def pacs(url: str, **kwargs: Any) -> PacsConfig:
    return PacsConfig(name=kwargs.pop("name", "main-pacs"), type=kwargs.pop("type", "dicomweb"), url=url, **kwargs)


# -- Basic and bearer -------------------------------------------------------------------------


def test_basic_auth_header_and_no_password_in_repr(canned: CannedServer, log_lines: list[str]) -> None:
    s = make_session(pacs(canned.url, username="relay", password=Secret(PASSWORD)))
    assert s.get(canned.url + "/x", timeout=5).status_code == 200
    sent = canned.received[0].headers["Authorization"]
    assert sent == "Basic " + base64.b64encode(f"relay:{PASSWORD}".encode()).decode()
    assert isinstance(s.auth, BasicAuth)
    assert PASSWORD not in repr(s.auth) and PASSWORD not in str(s.__dict__)
    assert not any(PASSWORD in line for line in log_lines)


def test_password_file(tmp_path: Any, canned: CannedServer) -> None:
    f = tmp_path / "pw"
    f.write_text(PASSWORD + "\n")
    s = make_session(pacs(canned.url, username="relay", password_file=str(f)))
    s.get(canned.url, timeout=5)
    assert canned.received[0].headers["Authorization"].startswith("Basic ")
    assert base64.b64decode(canned.received[0].headers["Authorization"][6:]).decode() == f"relay:{PASSWORD}"


def test_static_bearer_token(canned: CannedServer) -> None:
    s = make_session(pacs(canned.url, token=Secret("abc.def.ghi")))
    s.get(canned.url, timeout=5)
    assert canned.received[0].headers["Authorization"] == "Bearer abc.def.ghi"
    assert isinstance(s.auth, BearerAuth) and "abc.def" not in repr(s.auth)


def test_no_credentials_no_header(canned: CannedServer) -> None:
    s = make_session(pacs(canned.url))
    assert s.auth is None
    s.get(canned.url, timeout=5)
    assert "Authorization" not in canned.received[0].headers


def _sender_with_threads(cfg: PacsConfig, threads: int = 3) -> None:
    """What the daemon does: one sender, a client (session) per worker thread."""
    from relaypacsd.senders import DicomWebSender

    sender = DicomWebSender(cfg)
    workers = [threading.Thread(target=lambda: sender.client) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(5)


def test_plain_http_with_credentials_warns_once(log_lines: list[str]) -> None:
    cfg = pacs("http://pacs.example:8042", username="relay", password=Secret(PASSWORD))
    _sender_with_threads(cfg)  # one sender, three sessions: one warning
    warnings = [line for line in log_lines if line.startswith("WARNING") and "plain http://" in line]
    assert len(warnings) == 1
    assert "main-pacs" in warnings[0] and "MAIN_PACS_URL" in warnings[0]
    assert PASSWORD not in "".join(log_lines)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8042", "http://localhost:8042", "http://[::1]:8042",
                                 "https://pacs.example"])
def test_no_plain_http_warning_for_loopback_or_https(url: str, log_lines: list[str]) -> None:
    _sender_with_threads(pacs(url, username="relay", password=Secret(PASSWORD)))
    assert not [line for line in log_lines if "plain http" in line]


def test_plain_http_without_credentials_does_not_warn(log_lines: list[str]) -> None:
    _sender_with_threads(pacs("http://pacs.example:8042"))
    assert not [line for line in log_lines if "plain http" in line]


def test_a_command_client_warns_itself(log_lines: list[str]) -> None:
    from relaypacsd.dicomweb import DicomWebClient

    DicomWebClient(pacs("http://pacs.example:8042", token=Secret("tok")))
    assert len([line for line in log_lines if "plain http://" in line]) == 1


# -- TLS settings -----------------------------------------------------------------------------


def test_tls_verify_ca_bundle_and_client_cert(log_lines: list[str]) -> None:
    s = make_session(pacs("https://pacs.example:443", ca_bundle="/etc/ca.pem",
                          client_cert="/etc/c.crt", client_key="/etc/c.key"))
    assert s.verify == "/etc/ca.pem"
    assert s.cert == ("/etc/c.crt", "/etc/c.key")
    assert not log_lines


def test_tls_single_pem_client_cert() -> None:
    s = make_session(pacs("https://pacs.example", client_cert="/etc/both.pem"))
    assert s.verify is True and s.cert == "/etc/both.pem"


def test_verify_off_is_loud_and_once(log_lines: list[str]) -> None:
    cfg = pacs("https://pacs.example", verify_tls=False)
    s = make_session(cfg)
    _sender_with_threads(cfg)
    assert s.verify is False
    loud = [line for line in log_lines if "verification is OFF" in line]
    assert len(loud) == 1 and loud[0].startswith("WARNING") and "ca_bundle" in loud[0]


def test_tls_kwargs_reach_the_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_send(self: Any, request: Any, **kwargs: Any) -> requests.Response:
        seen.update(kwargs)
        r = requests.Response()
        r.status_code = 200
        r.request = request
        r._content = b""
        return r

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", fake_send)
    # Plain requests would let this variable replace session.verify (requests #3829).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/env-bundle.pem")
    s = make_session(pacs("https://pacs.example", ca_bundle="/etc/ca.pem", client_cert="/c", client_key="/k"))
    s.get("https://pacs.example/x", timeout=(1, 2))
    assert seen["verify"] == "/etc/ca.pem" and seen["cert"] == ("/c", "/k") and seen["timeout"] == (1, 2)


# -- pool and retries -------------------------------------------------------------------------


def test_adapter_pool_and_connect_only_retries() -> None:
    s = make_session(pacs("http://127.0.0.1:1"), pool_size=7)
    adapter = s.get_adapter("http://127.0.0.1:1/")
    assert adapter._pool_maxsize == 7
    retry = adapter.max_retries
    assert retry.connect == 2 and retry.read is False and retry.status == 0 and retry.other == 0


def test_post_not_retried_after_server_error(canned: CannedServer) -> None:
    canned.responder = lambda rec: Answer(503)
    s = make_session(pacs(canned.url))
    assert s.post(canned.url + "/studies", data=b"x", timeout=5).status_code == 503
    assert len(canned.received) == 1


def test_read_timeout_not_retried(canned: CannedServer) -> None:
    canned.responder = lambda rec: Answer(200, delay=1.0)
    s = make_session(pacs(canned.url))
    with pytest.raises(requests.exceptions.ReadTimeout):
        s.post(canned.url + "/studies", data=b"x", timeout=(2, 0.3))
    time.sleep(0.9)
    assert len(canned.received) == 1


def test_connection_refused_retried_then_raised() -> None:
    s = make_session(pacs("http://127.0.0.1:1"))
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):
        s.get("http://127.0.0.1:1/system", timeout=(1, 1))
    assert time.monotonic() - start < 5


# -- OAuth2 client credentials ----------------------------------------------------------------


def oauth_pacs(server: CannedServer, **kwargs: Any) -> PacsConfig:
    return pacs(server.url.replace("127.0.0.1", "127.0.0.1"), oauth2_token_url=server.url + "/token",
                client_id="relay-gw", client_secret=Secret("cl1ent-s3cret"), oauth2_scope="stow", **kwargs)


def test_oauth2_token_fetched_once_for_many_calls(canned: CannedServer) -> None:
    oauth = OAuthServer(canned)
    s = make_session(oauth_pacs(canned))
    assert isinstance(s.auth, OAuth2ClientCredentials)
    for _ in range(5):
        assert s.get(canned.url + "/studies", timeout=5).json() == {"ok": "tok-1"}
    assert len(oauth.token_requests) == 1
    tr = oauth.token_requests[0]
    assert tr.method == "POST"
    assert b"grant_type=client_credentials" in tr.body and b"scope=stow" in tr.body
    assert tr.headers["Authorization"] == "Basic " + base64.b64encode(b"relay-gw:cl1ent-s3cret").decode()
    assert "cl1ent" not in repr(s.auth)


def test_oauth2_token_refreshed_before_expiry(canned: CannedServer) -> None:
    oauth = OAuthServer(canned, expires_in=300)
    s = make_session(oauth_pacs(canned))
    now = [1000.0]
    s.auth.clock = lambda: now[0]  # type: ignore[union-attr]
    s.get(canned.url + "/a", timeout=5)
    now[0] += 300 - 31  # inside the 30 s margin: still the old token
    s.get(canned.url + "/a", timeout=5)
    assert len(oauth.token_requests) == 1
    now[0] += 2  # past expires_in minus the margin
    assert s.get(canned.url + "/a", timeout=5).json() == {"ok": "tok-2"}
    assert len(oauth.token_requests) == 2


def test_oauth2_refetched_exactly_once_on_401_then_success(canned: CannedServer) -> None:
    oauth = OAuthServer(canned)
    s = make_session(oauth_pacs(canned))
    s.get(canned.url + "/a", timeout=5)
    oauth.valid.clear()  # the PACS revoked tok-1 before its expiry
    resp = s.get(canned.url + "/a", timeout=5)
    assert resp.status_code == 200 and resp.json() == {"ok": "tok-2"}
    assert [h.status_code for h in resp.history] == [401]
    assert len(oauth.token_requests) == 2
    resource_calls = [r for r in canned.received if r.path == "/a"]
    assert len(resource_calls) == 3  # first call, the 401, the one re-send


def test_oauth2_persistent_401_is_not_a_loop(canned: CannedServer) -> None:
    oauth = OAuthServer(canned)
    s = make_session(oauth_pacs(canned))
    oauth.respond_resource_401 = True  # type: ignore[attr-defined]
    canned.responder = lambda rec: oauth.respond(rec) if rec.path == "/token" else Answer(401)
    resp = s.get(canned.url + "/a", timeout=5)
    assert resp.status_code == 401
    assert len(oauth.token_requests) == 2
    assert len([r for r in canned.received if r.path == "/a"]) == 2


def test_oauth2_threads_share_one_token(canned: CannedServer) -> None:
    oauth = OAuthServer(canned)
    errors: list[BaseException] = []
    pacs = oauth_pacs(canned)
    shared = make_auth(pacs, *tls_settings(pacs))  # what DicomWebSender does for its worker threads

    def work() -> None:
        try:
            sess = make_session(pacs, auth=shared)  # one session per worker thread
            for _ in range(5):
                sess.get(canned.url + "/a", timeout=5).raise_for_status()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and len(oauth.token_requests) == 1


def test_oauth2_bad_client_secret_is_destination_problem(canned: CannedServer) -> None:
    canned.responder = lambda rec: Answer(401, {"error": "invalid_client"}) if rec.path == "/token" else Answer()
    s = make_session(oauth_pacs(canned))
    with pytest.raises(DestinationProblem) as info:
        s.get(canned.url + "/a", timeout=5)
    msg = str(info.value)
    assert "main-pacs" in msg and "client_secret" in msg and "cl1ent-s3cret" not in msg


def test_sender_gives_each_thread_its_own_session_and_one_shared_auth(canned: CannedServer) -> None:
    from relaypacsd.senders import DicomWebSender

    sender = DicomWebSender(oauth_pacs(canned))
    seen = []

    def grab() -> None:
        seen.append(sender.client)

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    sessions = {id(c.session) for c in seen}
    assert len(sessions) == 3 and len({id(c.session.auth) for c in seen}) == 1
    assert sender.client is sender.client  # one per thread, reused


def test_the_environment_is_read_once_per_address_with_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests walks os.environ for proxies at every request (140 us): a session reads it once per address."""
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    calls: list[str] = []
    real = requests.Session.merge_environment_settings
    monkeypatch.setattr(requests.Session, "merge_environment_settings",
                        lambda self, url, *a: calls.append(url) or real(self, url, *a))
    session = make_session(PacsConfig(name="p", url="http://pacs.example:8042"))
    for url in ("http://pacs.example:8042/dicom-web/studies", "http://pacs.example:8042/dicom-web/studies?x=1",
                "http://127.0.0.1:8042/studies"):
        for _ in range(3):
            got = session.merge_environment_settings(url, {}, None, None, None)
            assert got == real(requests.Session(), url, {}, None, session.verify, None)
    assert len(calls) == 2  # once per address
    proxies = session.merge_environment_settings("http://pacs.example:8042/a", {}, None, None, None)["proxies"]
    assert proxies["http"] == "http://proxy.example:3128"
