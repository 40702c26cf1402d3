"""The one factory for a requests.Session per PACS: authentication, TLS, connection pool, retries.

Only connection errors are retried inside urllib3 (nothing was sent yet, so it is safe even for a
POST); every other retry is decided by the delivery code from the per-instance outcomes.
One session per worker thread: requests.Session is not documented as thread-safe.
"""

from __future__ import annotations

import base64
import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
from loguru import logger
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.util.retry import Retry

from relaypacsd.config import PacsConfig, Secret, pacs_env_prefix, resolve_secret
from relaypacsd.errors import DestinationProblem, PacsUnreachable

CONNECT_RETRIES = 2
TOKEN_MARGIN_SECONDS = 30.0
DEFAULT_TOKEN_LIFETIME = 300.0

def security_warnings(pacs: PacsConfig) -> list[str]:
    """What is unsafe about how we talk to this PACS: credentials over plain http, TLS not verified.

    The owner of a PACS's sessions logs these once (DicomWebSender per daemon start, a command per run),
    rather than every session, of which there is one per thread."""
    out = []
    has_credentials = bool(pacs.username or pacs.token or pacs.token_file or pacs.oauth2_token_url)
    if has_credentials and pacs.url.startswith("http://") and not _is_loopback(pacs.url):
        out.append(f"PACS '{pacs.name}': credentials are sent over plain http:// to {pacs.url}: anyone on the "
                   f"network path can read them; use https:// (set {env_prefix(pacs)}URL)")
    token_url = pacs.oauth2_token_url
    if token_url.startswith("http://") and not _is_loopback(token_url):
        out.append(f"PACS '{pacs.name}': the OAuth2 client secret is sent over plain http:// to {token_url}: "
                   "anyone on the network path can read it; use https:// for oauth2_token_url")
    if not pacs.ca_bundle and not pacs.verify_tls and pacs.url.startswith("https://"):
        out.append(f"PACS '{pacs.name}': TLS certificate verification is OFF (verify_tls = false): anyone on "
                   f"the network path to {pacs.url} can read and alter the images and the credentials; "
                   f"set ca_bundle to the PACS's CA certificate instead")
    return out


def log_security_warnings(pacs: PacsConfig) -> None:
    """Log security_warnings(pacs) as warnings."""
    for message in security_warnings(pacs):
        logger.warning(message)


def env_prefix(pacs: PacsConfig) -> str:
    """'ORTHANC_' for [pacs.orthanc]: the prefix of its environment variables."""
    return pacs_env_prefix(pacs.name)


def basic_header(username: str, password: Secret) -> str:
    """The Basic Authorization header value (latin-1 like requests, UTF-8 when latin-1 cannot)."""
    raw = f"{username}:{password.reveal()}"
    try:
        data = raw.encode("latin-1")
    except UnicodeEncodeError:
        data = raw.encode("utf-8")
    return "Basic " + base64.b64encode(data).decode("ascii")


class BasicAuth(AuthBase):
    """HTTP Basic with the password kept in a Secret until the header is built."""

    def __init__(self, username: str, password: Secret):
        self.username = username
        self.password = password

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = basic_header(self.username, self.password)
        return r

    def __repr__(self) -> str:
        return f"BasicAuth({self.username!r}, {self.password!r})"


class BearerAuth(AuthBase):
    """A static bearer token (`token` / `token_file`)."""

    def __init__(self, token: Secret):
        self.token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token.reveal()}"
        return r

    def __repr__(self) -> str:
        return f"BearerAuth({self.token!r})"


class OAuth2ClientCredentials(AuthBase):
    """OAuth2 client credentials (RFC 6749 §4.4): a token fetched before first use and before it
    expires, and once more when the PACS answers 401 (the request is then re-sent once)."""

    def __init__(self, pacs: PacsConfig, client_secret: Secret, *, verify: bool | str = True,
                 cert: str | tuple[str, str] | None = None,
                 margin: float = TOKEN_MARGIN_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.pacs_name = pacs.name
        self.token_url = pacs.oauth2_token_url
        self.client_id = pacs.client_id
        self.client_secret = client_secret
        self.scope = pacs.oauth2_scope
        self.timeout = (pacs.connect_timeout, pacs.read_timeout)
        self.verify = verify
        self.cert = cert
        self.margin = margin
        self.clock = clock
        self._token: Secret | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OAuth2ClientCredentials({self.token_url!r}, client_id={self.client_id!r})"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token().reveal()}"
        r.register_hook("response", self._retry_on_401)
        return r

    def token(self, *, stale: str | None = None) -> Secret:
        """The current token; a new one when it is about to expire or equals `stale` (it got a 401)."""
        with self._lock:
            # Compare with the token that got the 401 so that N threads hit by the same expiry
            # fetch one new token between them, not N.
            expired = self._token is None or self.clock() >= self._expires_at
            if expired or (stale is not None and self._token.reveal() == stale):
                self._token, lifetime = self._fetch()
                margin = min(self.margin, lifetime / 2)
                self._expires_at = self.clock() + lifetime - margin
            return self._token

    def _fetch(self) -> tuple[Secret, float]:
        data = {"grant_type": "client_credentials"}
        if self.scope:
            data["scope"] = self.scope
        where = f"PACS '{self.pacs_name}': OAuth2 token endpoint {self.token_url}"
        try:
            resp = requests.post(self.token_url, data=data, auth=(self.client_id, self.client_secret.reveal()),
                                 headers={"Accept": "application/json"}, timeout=self.timeout,
                                 verify=self.verify, cert=self.cert)
        except requests.RequestException as exc:
            raise PacsUnreachable(f"{where} unreachable ({type(exc).__name__}): check oauth2_token_url, "
                                  "DNS and firewall", sent=False) from None  # no image was sent yet
        if resp.status_code in (400, 401, 403):
            raise DestinationProblem(
                f"{where} refused client_id {self.client_id!r} (HTTP {resp.status_code}): check client_id, "
                f"client_secret / client_secret_file and oauth2_scope in [pacs.{self.pacs_name}]",
                status=resp.status_code)
        try:
            doc = resp.json()
            token = doc["access_token"]
        except (ValueError, KeyError, TypeError):
            raise DestinationProblem(f"{where} answered HTTP {resp.status_code} without an access_token: "
                                     "check oauth2_token_url", status=resp.status_code) from None
        try:
            lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME
        return Secret(str(token)), max(lifetime, 1.0)

    def _retry_on_401(self, resp: requests.Response, **kwargs: Any) -> requests.Response:
        if resp.status_code != 401:
            return resp
        prep = resp.request
        body = prep.body
        # A one-shot iterator cannot be sent twice; re-iterable bodies (dicomweb.StowBody) can.
        if body is not None and not isinstance(body, (bytes, str)) and iter(body) is body:
            self.token(stale=_bearer_of(prep))
            return resp
        sent_with = _bearer_of(prep)
        new_token = self.token(stale=sent_with)
        resp.content  # noqa: B018 - drain so the connection returns to the pool
        resp.close()
        retry = prep.copy()
        retry.headers["Authorization"] = f"Bearer {new_token.reveal()}"
        # Sent through the adapter directly: hooks do not run again, so at most one re-send.
        new_resp = resp.connection.send(retry, **kwargs)
        new_resp.history.append(resp)
        new_resp.request = retry
        return new_resp


def _bearer_of(prep: requests.PreparedRequest) -> str | None:
    value = prep.headers.get("Authorization", "")
    return value[len("Bearer "):] if value.startswith("Bearer ") else None


def tls_settings(pacs: PacsConfig) -> tuple[bool | str, str | tuple[str, str] | None]:
    """(verify, cert) for requests: the CA bundle when given; verify=False only as configured (and warned)."""
    verify: bool | str = pacs.ca_bundle or pacs.verify_tls
    cert: str | tuple[str, str] | None = None
    if pacs.client_cert and pacs.client_key:
        cert = (pacs.client_cert, pacs.client_key)
    elif pacs.client_cert:
        cert = pacs.client_cert  # one PEM holding certificate and key
    return verify, cert


def make_auth(pacs: PacsConfig, verify: bool | str = True,
              cert: str | tuple[str, str] | None = None) -> AuthBase | None:
    """OAuth2 client credentials, else a static bearer token, else Basic; None without credentials."""
    if pacs.oauth2_token_url:
        return OAuth2ClientCredentials(pacs, resolve_secret(pacs, "client_secret"), verify=verify, cert=cert)
    token = resolve_secret(pacs, "token")
    if token:
        return BearerAuth(token)
    if pacs.username:
        return BasicAuth(pacs.username, resolve_secret(pacs, "password"))
    return None


class PacsSession(requests.Session):
    """A Session whose own `verify` wins over $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE.

    Plain requests lets those variables replace session.verify on every request that does not pass
    verify= itself (requests issue #3829), which would silently drop a configured ca_bundle."""

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[Any, ...], dict[str, Any]] = {}

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        if verify is None:
            verify = self.verify
        # Once per address: requests walks os.environ for proxies at every request (5 us per file sent); a
        # daemon's environment does not change while it runs.
        key = (urlsplit(url)[:2], tuple(sorted((proxies or {}).items())), stream, verify, cert)
        try:
            found = self._environment.get(key)
        except TypeError:  # an unhashable argument: as requests does it
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        if found is None:
            found = self._environment[key] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        return dict(found)


def _is_loopback(url: str) -> bool:
    """True for 127.x, ::1 and localhost: plain http there never leaves the machine."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_session(pacs: PacsConfig, pool_size: int = 4, auth: AuthBase | None = None) -> requests.Session:
    """A Session for one PACS (use one per thread): auth, TLS, a pool of `pool_size`, connect retries.

    Pass `auth` to share one (an OAuth2 token cache) between the sessions of several threads."""
    session = PacsSession()
    verify, cert = tls_settings(pacs)
    session.verify = verify
    session.cert = cert
    if auth is None:
        auth = make_auth(pacs, verify, cert)
    session.auth = auth
    # Connect errors only: a POST whose body may have reached the PACS is never re-sent here.
    retry = Retry(total=None, connect=CONNECT_RETRIES, read=False, status=0, other=0, redirect=0,
                  allowed_methods=None, backoff_factor=0.2, raise_on_status=False, raise_on_redirect=False)
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "relaypacsd"
    return session
