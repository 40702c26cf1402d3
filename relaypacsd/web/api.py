"""The JSON API behind every page (described in openapi.py): reads for anyone the level allows, actions for
operators with the session's CSRF token in the X-CSRF-Token header."""

from __future__ import annotations

import io
import json
from functools import partial
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relaypacsd.commands.common import UsageError
from relaypacsd.commands.history import as_dict, write_csv
from relaypacsd.errors import PauseError
from relaypacsd.web.access import Access, Level, Verdict
from relaypacsd.web.openapi import document
from relaypacsd.web.view import HISTORY_LIMIT, DaemonView

MAX_BODY = 1 << 20  # bytes of a POST body: a selection of a few thousand ids fits
FAILED_PAGE = 500  # files in one answer of /api/failed unless ?limit= says otherwise


def refusal(verdict: Verdict) -> JSONResponse:
    return JSONResponse({"error": verdict.message}, status_code=verdict.status)


def failed_query(view: DaemonView, params: Any) -> dict[str, Any]:
    """The failed files that match ?q= (search), ?stage= and ?pacs=, newest first, at most ?limit=."""
    files = view.failed()
    q, stage, pacs = params.get("q", "").strip(), params.get("stage", ""), params.get("pacs", "")
    try:
        limit = max(1, min(5000, int(params.get("limit", FAILED_PAGE))))
    except ValueError:
        limit = FAILED_PAGE
    hits = [f for f in files if (not stage or f.stage == stage) and (not pacs or pacs in f.pacs)
            and (not q or f.matches(q))]
    return {"total": len(files), "matching": len(hits), "files": [f.to_dict() for f in hits[:limit]],
            "stages": sorted({f.stage for f in files if f.stage}), "pacs": sorted({p for f in files for p in f.pacs})}


class Api:
    """The API's handlers over one view and one access policy."""

    def __init__(self, view: DaemonView, access: Access):
        self.view, self.access = view, access

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz),
            Route("/api/openapi.json", self.openapi),
            Route("/api/session", self.session),
            Route("/api/status", self.status),
            Route("/api/charts", self.charts),
            Route("/api/failed", self.failed),
            Route("/api/failed/retry", self.retry, methods=["POST"]),
            Route("/api/pacs/{name}/pause", partial(self.pause, paused=True), methods=["POST"]),
            Route("/api/pacs/{name}/resume", partial(self.pause, paused=False), methods=["POST"]),
            Route("/api/config", self.config),
            Route("/api/history", self.history),
        ]

    def healthz(self, request: Request) -> JSONResponse:
        """200 while the daemon runs with all its threads, else 503 (for a load balancer; no data, no login)."""
        ok = self.view.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(document())

    def session(self, request: Request) -> JSONResponse:
        s = self.access.session(request)
        return JSONResponse({"user": s.user if s else None, "role": s.role if s else None,
                             "csrf": s.csrf if s else None, "read_only": self.access.open_mode})

    def status(self, request: Request) -> JSONResponse:
        verdict = self.access.check(request, Level.OVERVIEW)
        return JSONResponse(self.view.status()) if verdict.ok else refusal(verdict)

    def charts(self, request: Request) -> JSONResponse:
        verdict = self.access.check(request, Level.OVERVIEW)
        if not verdict.ok:
            return refusal(verdict)
        span = request.query_params.get("span", "hour")
        if span not in ("hour", "day"):
            return JSONResponse({"error": "span: use hour or day"}, status_code=400)
        return JSONResponse(self.view.charts(span))

    def failed(self, request: Request) -> JSONResponse:
        verdict = self.access.check(request, Level.FILES)
        return JSONResponse(failed_query(self.view, request.query_params)) if verdict.ok else refusal(verdict)

    def history(self, request: Request) -> Response:
        """The delivery history with `relaypacsd history`'s filters; ?format=csv downloads it as CSV."""
        verdict = self.access.check(request, Level.FILES)
        if not verdict.ok:
            return refusal(verdict)
        try:
            found = self.view.history(request.query_params)
        except UsageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if request.query_params.get("format") == "csv":
            out = io.StringIO()
            write_csv(found, out)
            return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="relaypacsd-history.csv"'})
        return JSONResponse({"records": [as_dict(r) for r in found], "limit": HISTORY_LIMIT})

    def config(self, request: Request) -> JSONResponse:
        verdict = self.access.check(request, Level.FILES)
        return JSONResponse(self.view.config()) if verdict.ok else refusal(verdict)

    async def _act(self, request: Request) -> tuple[Verdict, dict[str, Any] | None]:
        verdict = self.access.check(request, Level.ACT, request.headers.get("x-csrf-token"))
        if not verdict.ok:
            return verdict, None
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return Verdict(False, verdict.session, 413, "request body too large"), None
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return Verdict(False, verdict.session, 400, "the body must be JSON"), None
        return verdict, body if isinstance(body, dict) else {}

    async def retry(self, request: Request) -> JSONResponse:
        """Body {"ids": [...]} or {"all": true}: the files go back to sending/ for the PACS that need them."""
        verdict, body = await self._act(request)
        if body is None:
            return refusal(verdict)
        assert verdict.session is not None
        ids = body.get("ids")
        if body.get("all") is True:
            ids = None
        elif not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return JSONResponse({"error": "name the files: {\"ids\": [\"0/a.dcm\", ...]} or {\"all\": true}"},
                                status_code=400)
        result = await anyio.to_thread.run_sync(self.view.retry, ids, verdict.session.user)
        refused_all = not result["queued"] and result["errors"]
        return JSONResponse(result, status_code=409 if refused_all else 200)

    async def pause(self, request: Request, paused: bool) -> JSONResponse:
        verdict, body = await self._act(request)
        if body is None:
            return refusal(verdict)
        assert verdict.session is not None
        name = request.path_params["name"]
        try:
            result = await anyio.to_thread.run_sync(self.view.pause, name, paused, verdict.session.user)
        except PauseError as exc:
            status = 404 if "no active PACS" in str(exc) else 409
            return JSONResponse({"error": str(exc)}, status_code=status)
        return JSONResponse(result)
