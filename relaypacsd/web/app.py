"""The dashboard's ASGI application: pages, API, static files, security headers, the charts' sampler."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import anyio.to_thread
from loguru import logger
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relaypacsd.web.access import Access
from relaypacsd.web.api import Api
from relaypacsd.web.pages import Pages
from relaypacsd.web.view import SAMPLE_EVERY, DaemonView

STATIC = Path(__file__).parent / "static"
# Scripts, styles and images from this server only (nothing from the internet: hospital networks have none),
# no inline script, no framing (clickjacking of the retry buttons).
HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Adds HEADERS to every answer, and `no-store` to every answer that is not a static file."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + HEADERS
                if not static:  # figures and file names must not sit in a shared cache
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def build_app(view: DaemonView, access: Access) -> ASGIApp:
    """The whole dashboard over `view`, guarded by `access`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_sample_forever, view)
            yield
            tasks.cancel_scope.cancel()

    routes = [*Pages(view, access).routes(), *Api(view, access).routes(),
              Mount("/static", StaticFiles(directory=str(STATIC)), name="static")]
    return SecurityHeaders(Starlette(routes=routes, lifespan=lifespan))


async def _sample_forever(view: DaemonView) -> None:
    """The charts' looks, every SAMPLE_EVERY seconds, in a worker thread (the journal may be busy). While the
    daemon is not ready (a reload), every half second."""
    while True:
        done = False
        try:
            done = await anyio.to_thread.run_sync(view.sample)
        except Exception:  # a failed look costs one point of a chart, never the dashboard
            logger.exception("dashboard: taking a chart sample failed")
        await anyio.sleep(SAMPLE_EVERY if done else 0.5)
