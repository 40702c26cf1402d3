"""Who may see and do what on the dashboard, decided in one place.

Three levels: OVERVIEW (counts, health, charts: no file names, so open on loopback when there are no users),
FILES (file names and IDs can carry patient identity: always a login) and ACT (an operator's login and the
session's CSRF token). Without a users file the dashboard runs read-only on loopback: OVERVIEW only.
"""

from __future__ import annotations

import asyncio
import secrets
from functools import partial
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qs

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response

from relaypacsd.web.sessions import (COOKIE, FAIL_DELAY, LOGIN_COOKIE, LoginThrottle, Session, Sessions,
                                     same_token)
from relaypacsd.web.users import User, Users

NO_USERS = ("no users are set up: the dashboard is read-only and shows the overview only. Add one with "
            "`relaypacsd user add NAME --role operator`, set web.users_file in relaypacs.toml, and restart relaypacsd")


class Level(Enum):
    OVERVIEW = "overview"
    FILES = "files"
    ACT = "act"


@dataclass(frozen=True)
class Verdict:
    """The answer to "may this request go on?": `session` when logged in; `status` and `message` when not."""

    ok: bool
    session: Session | None = None
    status: int = 200
    message: str = ""


class Access:
    """The dashboard's accounts, sessions and login brake."""

    def __init__(self, users: Users | None, tls: bool):
        self.users = users
        self.tls = tls
        self.sessions = Sessions()
        self.throttle = LoginThrottle()

    @property
    def open_mode(self) -> bool:
        """No users file: read-only, overview only (only ever on loopback: config.py refuses other addresses)."""
        return self.users is None

    def session(self, request: Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None and self.users is not None:
            user = self.users.get(session.user)
            if user is None or user.role != session.role:  # removed, or its role changed: log in again
                self.sessions.drop(request.cookies.get(COOKIE))
                return None
        return session

    def check(self, request: Request, level: Level, csrf: str | None = None) -> Verdict:
        """May `request` go on at `level`? `csrf` is the token the request carries (ACT only)."""
        session = self.session(request)
        if level is Level.OVERVIEW and (self.open_mode or session is not None):
            return Verdict(True, session)
        if self.open_mode:
            return Verdict(False, None, 403, NO_USERS)
        if session is None:
            return Verdict(False, None, 401, "log in first (your session may have ended)")
        if level is Level.FILES:
            return Verdict(True, session)
        if not same_token(csrf, session.csrf):
            return Verdict(False, session, 403, "refused: the request carries no valid CSRF token (reload the page)")
        if not session.operator:
            return Verdict(False, session, 403, f"refused: {session.user} is a viewer; retrying and pausing need the "
                                                "operator role (`relaypacsd user add NAME --role operator`)")
        return Verdict(True, session)

    def secure(self, request: Request) -> bool:
        """Cookies get Secure under TLS (ours, or a reverse proxy's that says so from loopback)."""
        return self.tls or request.url.scheme == "https"

    # -- logging in --------------------------------------------------------------------------------

    def login_token(self, request: Request) -> str:
        """The login form's CSRF token: the one in its cookie, or a new one (set by `set_login_cookie`)."""
        return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)

    def set_login_cookie(self, request: Request, response: Response, token: str) -> None:
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=self.secure(request),
                            path="/login", max_age=3600)

    async def login(self, request: Request) -> tuple[User | None, str]:
        """Check a posted login form: (the user, "") or (None, why). Failures wait and are braked."""
        body = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
        name = (body.get("name") or [""])[0].strip()
        password = (body.get("password") or [""])[0]
        if not same_token((body.get("csrf") or [""])[0], request.cookies.get(LOGIN_COOKIE)):
            return None, "refused: the login form carries no valid CSRF token (reload the page and try again)"
        if self.users is None:
            return None, NO_USERS
        address = request.client.host if request.client else "?"
        wait = self.throttle.wait(name, address)
        if wait > 0:
            return None, f"too many failed logins: try again in {int(wait) + 1} s"
        user = await anyio.to_thread.run_sync(partial(self.users.authenticate, name, password))  # argon2: ~50 ms, off the loop
        if user is None:
            self.throttle.failed(name, address)
            await asyncio.sleep(FAIL_DELAY)
            return None, "wrong user name or password"
        self.throttle.succeeded(name, address)
        return user, ""

    def start_session(self, request: Request, response: Response, user: User) -> Session:
        token, session = self.sessions.create(user.name, user.role)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=self.secure(request), path="/")
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return session

    def end_session(self, request: Request, response: Response) -> None:
        self.sessions.drop(request.cookies.get(COOKIE))
        response.delete_cookie(COOKIE, path="/")
