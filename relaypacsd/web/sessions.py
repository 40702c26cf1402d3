"""Logins of the dashboard: server-side sessions with their CSRF tokens, and the brake on failed logins.

A session id is 32 random bytes in an HttpOnly cookie; only its sha256 is kept here, so not even this
process's memory holds a usable id. Sessions end after IDLE seconds without a request, or MAX_AGE after the
login, or when the daemon restarts (they are never written anywhere).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

IDLE = 8 * 3600.0
MAX_AGE = 24 * 3600.0
COOKIE = "relaypacs_session"
LOGIN_COOKIE = "relaypacs_login"  # the login form's CSRF token, before any session exists

FAIL_DELAY = 1.0  # seconds every failed login waits before its answer
FREE_FAILURES = 5  # failures (per name and per address) before logins are refused for a while
LOCKOUT = 60.0  # seconds of the first refusal; doubles with each further failure, up to LOCKOUT_MAX
LOCKOUT_MAX = 900.0
FORGET_AFTER = 3600.0  # seconds after which an address's or name's failures are forgotten


@dataclass
class Session:
    """One logged-in user."""

    user: str
    role: str
    csrf: str
    created: float
    seen: float

    @property
    def operator(self) -> bool:
        return self.role == "operator"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens; False when either is missing."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


class Sessions:
    """The sessions of one dashboard, in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_digest: dict[str, Session] = {}

    def create(self, user: str, role: str, now: float | None = None) -> tuple[str, Session]:
        """A new session: (the id for the cookie, the session)."""
        now = time.monotonic() if now is None else now
        token = secrets.token_urlsafe(32)
        session = Session(user=user, role=role, csrf=secrets.token_urlsafe(32), created=now, seen=now)
        with self._lock:
            self._prune(now)
            self._by_digest[_digest(token)] = session
        return token, session

    def get(self, token: str | None, now: float | None = None) -> Session | None:
        """The live session of this cookie value, touched; None when unknown or expired."""
        if not token:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            session = self._by_digest.get(_digest(token))
            if session is None:
                return None
            if now - session.seen > IDLE or now - session.created > MAX_AGE:
                del self._by_digest[_digest(token)]
                return None
            session.seen = now
            return session

    def drop(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._by_digest.pop(_digest(token), None)

    def drop_user(self, user: str) -> None:
        """End every session of `user` (removed, or its role changed)."""
        with self._lock:
            for key in [k for k, s in self._by_digest.items() if s.user == user]:
                del self._by_digest[key]

    def __len__(self) -> int:
        return len(self._by_digest)

    def _prune(self, now: float) -> None:
        for key in [k for k, s in self._by_digest.items() if now - s.seen > IDLE or now - s.created > MAX_AGE]:
            del self._by_digest[key]


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@dataclass
class LoginThrottle:
    """Failed logins per user name and per client address: each waits FAIL_DELAY, and after FREE_FAILURES
    further tries are refused for a time that doubles with each failure (a guesser gets a few per hour)."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: dict[str, _Failures] = field(default_factory=dict)

    def wait(self, name: str, address: str, now: float | None = None) -> float:
        """Seconds until this name or address may try again (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return max(0.0, *(self._get(key, now).locked_until - now for key in self._keys(name, address)))

    def failed(self, name: str, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in self._keys(name, address):
                f = self._get(key, now)
                f.count += 1
                f.last = now
                if f.count >= FREE_FAILURES:
                    f.locked_until = now + min(LOCKOUT_MAX, LOCKOUT * 2 ** (f.count - FREE_FAILURES))

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            for key in self._keys(name, address):
                self._seen.pop(key, None)

    @staticmethod
    def _keys(name: str, address: str) -> tuple[str, str]:
        return (f"name:{name.lower()}", f"addr:{address}")

    def _get(self, key: str, now: float) -> _Failures:
        if len(self._seen) > 10000:  # a flood of names must not grow this without bound
            for k in [k for k, f in self._seen.items() if now - f.last > FORGET_AFTER]:
                del self._seen[k]
        f = self._seen.get(key)
        if f is None or (now - f.last > FORGET_AFTER and now >= f.locked_until):
            f = self._seen[key] = _Failures()
        return f
