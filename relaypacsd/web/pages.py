"""The dashboard's HTML pages: Jinja2 skeletons that the page's script fills from the JSON API and refreshes
in place (no reload, no flashing), and the login form."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import jinja2
import tomli_w
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from relaypacsd import __version__
from relaypacsd.web.access import NO_USERS, Access, Level
from relaypacsd.web.sessions import same_token
from relaypacsd.web.view import DaemonView

TEMPLATES = Path(__file__).parent / "templates"
REFRESH_SECONDS = 3  # how often a page asks for fresh figures


def _safe_next(target: str | None) -> str:
    """A local path to go back to after the login; anything else (another host) becomes the overview."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class Pages:
    """The page handlers over one view and one access policy."""

    def __init__(self, view: DaemonView, access: Access):
        self.view, self.access = view, access
        # Autoescape on every template: file names and reasons are text, never markup.
        self.templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                                                                autoescape=True))

    def routes(self) -> list[Route]:
        return [
            Route("/", self.overview),
            Route("/failed", self.failed),
            Route("/config", self.config),
            Route("/history", self.history),
            Route("/timeline", self.timeline),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
        ]

    def _render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        session = self.access.session(request)
        base = {"user": session.user if session else None, "role": session.role if session else None,
                "csrf": session.csrf if session else "", "read_only": self.access.open_mode,
                "version": __version__, "refresh": REFRESH_SECONDS}
        return self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def _page(self, request: Request, level: Level, name: str, **context: Any) -> Response:
        verdict = self.access.check(request, level)
        if verdict.ok:
            return self._render(request, name, **context)
        if verdict.status == 401:
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return self._render(request, "message.html", verdict.status, title="Login needed", message=verdict.message)

    def overview(self, request: Request) -> Response:
        return self._page(request, Level.OVERVIEW, "overview.html", page="overview")

    def failed(self, request: Request) -> Response:
        return self._page(request, Level.FILES, "failed.html", page="failed")

    def history(self, request: Request) -> Response:
        from relaypacsd.history import OUTCOMES

        return self._page(request, Level.FILES, "history.html", page="history", outcomes=OUTCOMES,
                          pacs=[p.name for p in self.view.daemon.config.active()])

    def timeline(self, request: Request) -> Response:
        """One study's, instance's or file's events across every PACS, oldest first."""
        q = request.query_params
        what = next(((k, q[k]) for k in ("study", "sop", "file") if q.get(k)), None)
        if what is None:
            return self._render(request, "message.html", 400, title="Timeline",
                                message="name a study (?study=UID), an instance (?sop=UID) or a file (?file=NAME)")
        return self._page(request, Level.FILES, "timeline.html", page="timeline", kind=what[0], value=what[1])

    def config(self, request: Request) -> Response:
        shown = self.view.config()
        return self._page(request, Level.FILES, "config.html", page="config", toml=_toml(shown["config"]),
                          source=shown["source"])

    def login_form(self, request: Request, error: str = "", status: int = 200) -> Response:
        if self.access.open_mode:
            return self._render(request, "message.html", 403, title="No users", message=NO_USERS)
        token = self.access.login_token(request)
        response = self._render(request, "login.html", status, page="login", login_csrf=token, error=error,
                                next=_safe_next(request.query_params.get("next")))
        self.access.set_login_cookie(request, response, token)
        return response

    async def login(self, request: Request) -> Response:
        user, error = await self.access.login(request)
        if user is None:
            status = 429 if error.startswith("too many") else (403 if error.startswith("refused") else 401)
            return self.login_form(request, error, status)
        response = RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
        self.access.start_session(request, response, user)
        return response

    async def logout(self, request: Request) -> Response:
        session = self.access.session(request)
        body = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=5)
        if session is not None and not same_token((body.get("csrf") or [""])[0], session.csrf):
            return self._render(request, "message.html", 403, title="Refused",
                                message="refused: the request carries no valid CSRF token (reload the page)")
        response = RedirectResponse("/login", status_code=303)
        self.access.end_session(request, response)
        return response


def _toml(config: dict[str, Any]) -> str:
    """The masked config as `config show` prints it."""
    return tomli_w.dumps(config)
