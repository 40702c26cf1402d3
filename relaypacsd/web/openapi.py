"""The OpenAPI 3.1 document of the JSON API, served at /api/openapi.json (written out: the API is small)."""

from __future__ import annotations

from typing import Any

from relaypacsd import __version__


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_REFUSED = {
    "401": _ok("not logged in (the session ended, or none was started)", _ERROR),
    "403": _ok("not allowed: no users are set up (read-only mode), a viewer's account, or no valid CSRF token",
               _ERROR),
}
_CSRF = {"name": "X-CSRF-Token", "in": "header", "required": True, "schema": {"type": "string"},
         "description": "the session's CSRF token (GET /api/session)"}


def document() -> dict[str, Any]:
    """The whole document."""
    failed_file = {"type": "object", "properties": {k: {"type": "string"} for k in
                                                   ("id", "root", "file", "stage", "reason", "code", "next_step", "time")}
                   | {"pacs": {"type": "array", "items": {"type": "string"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "relaypacsd dashboard API", "version": __version__,
                 "description": "The JSON behind every page of the dashboard. Log in at /login (a session cookie); "
                                "without a users file only /api/status, /api/charts and /healthz answer, on loopback."},
        "components": {"securitySchemes": {"session": {"type": "apiKey", "in": "cookie", "name": "relaypacs_session"}}},
        "security": [{"session": []}],
        "paths": {
            "/healthz": {"get": {"summary": "liveness: 200 while the daemon and all its threads run, else 503",
                                 "security": [], "responses": {"200": _ok("running"), "503": _ok("not healthy")}}},
            "/api/openapi.json": {"get": {"summary": "this document", "security": [],
                                          "responses": {"200": _ok("the OpenAPI document")}}},
            "/api/session": {"get": {"summary": "who is logged in, the session's CSRF token, and whether the "
                                                "dashboard is read-only", "security": [],
                                     "responses": {"200": _ok("the session (nulls when not logged in)")}}},
            "/api/status": {"get": {
                "summary": "the document of `relaypacsd status --json` (daemon, watch roots, PACS), plus a gateway part",
                "responses": {"200": _ok("status", {"type": "object", "required": ["daemon", "watch", "pacs"]}),
                              **_REFUSED}}},
            "/api/charts": {"get": {
                "summary": "instances delivered per minute and files waiting, per PACS",
                "parameters": [{"name": "span", "in": "query", "schema": {"enum": ["hour", "day"], "default": "hour"}}],
                "responses": {"200": _ok("series: times (epoch seconds) and one list per PACS"), **_REFUSED}}},
            "/api/failed": {"get": {
                "summary": "the files in failed/ with stage, reason, code and next step (a login is needed)",
                "parameters": [{"name": n, "in": "query", "schema": {"type": t}, "description": d} for n, t, d in (
                    ("q", "string", "search in names, reasons, codes"), ("stage", "string", "validation, delivery, ..."),
                    ("pacs", "string", "refused by this PACS"), ("limit", "integer", "at most this many (500)"))],
                "responses": {"200": _ok("the files", {"type": "object", "properties": {
                    "total": {"type": "integer"}, "matching": {"type": "integer"},
                    "files": {"type": "array", "items": failed_file}}}), **_REFUSED}}},
            "/api/failed/retry": {"post": {
                "summary": "put failed files back into sending/ (operators), as `relaypacsd retry`",
                "parameters": [_CSRF],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "string"}}},
                     "required": ["ids"]},
                    {"type": "object", "properties": {"all": {"const": True}}, "required": ["all"]}]}}}},
                "responses": {"200": _ok("what was queued and what could not be"),
                              "409": _ok("none of them could be retried", {"type": "object"}), **_REFUSED}}},
            "/api/pacs/{name}/pause": {"post": {
                "summary": "hold one PACS: no new deliveries, its files wait (kept across restarts)",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}, _CSRF],
                "responses": {"200": _ok("paused"), "404": _ok("no such active PACS", _ERROR),
                              "409": _ok("already paused", _ERROR), **_REFUSED}}},
            "/api/pacs/{name}/resume": {"post": {
                "summary": "release a paused PACS",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}, _CSRF],
                "responses": {"200": _ok("resumed"), "404": _ok("no such active PACS", _ERROR),
                              "409": _ok("not paused", _ERROR), **_REFUSED}}},
            "/api/history": {"get": {
                "summary": "the delivery history with the filters of `relaypacsd history`, newest first (a login is needed)",
                "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}, "description": d} for n, d in (
                    ("study", "StudyInstanceUID"), ("patient", "PatientID"), ("accession", "AccessionNumber"),
                    ("sop", "SOPInstanceUID"), ("file", "the name as claimed, below sending/"),
                    ("pacs", "destination"), ("outcome", "delivered, failed, requeued, ..."),
                    ("since", "30m, 2h, 3d, 1w ago, or ISO 8601"), ("until", "the same"),
                    ("limit", "records (200; 0: every match, at most 10,000)"), ("format", "json (default) or csv"))],
                "responses": {"200": _ok("the records (or text/csv)"), "400": _ok("a filter is wrong", _ERROR),
                              **_REFUSED}}},
            "/api/config": {"get": {"summary": "the effective configuration, secrets masked (as `config show`)",
                                    "responses": {"200": _ok("source and config"), **_REFUSED}}},
        },
    }
