"""The dashboard's server: uvicorn (h11, asyncio) in one thread of the daemon, stopped with it.

Why uvicorn and Starlette: uvicorn serves HTTPS itself (web.tls_cert), stops cleanly from another thread
(`should_exit`), and one event loop answers every open page without a thread per connection; Starlette
brings routing, Jinja2 templates and static files without pulling in a larger framework. Only the few
handlers that touch the disk or the journal run in worker threads.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from loguru import logger

from relaypacsd.config import WebConfig
from relaypacsd.errors import ConfigError
from relaypacsd.web.access import Access
from relaypacsd.web.app import build_app
from relaypacsd.web.users import Users
from relaypacsd.web.view import DaemonView

if TYPE_CHECKING:
    from relaypacsd.daemon import Daemon

START_TIMEOUT = 10.0


def listen(address: str, port: int) -> socket.socket:
    """A listening socket on address:port; ConfigError (one line) when the port cannot be had."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted connection: an answer's head and body leave at once, not 40 ms apart
        # (Nagle's algorithm waiting for the client's delayed ACK; measured by bench/web.py).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"web.port = {port} on {address}: cannot listen there ({exc.strerror}): another process "
                          "uses it? pick another port, or 0 to turn the dashboard off") from None
    return sock


class WebServer:
    """The dashboard of one daemon: start() before the daemon's pieces, stop() after them."""

    def __init__(self, daemon: "Daemon", config: WebConfig):
        self.config = config
        self.view = DaemonView(daemon)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        host = f"[{self.config.address}]" if ":" in self.config.address else self.config.address
        return f"{scheme}://{host}:{self.config.port}/"

    def start(self) -> None:
        """Listen and serve in the "web" thread; ConfigError for a users file, port or certificate not usable."""
        cfg = self.config
        users = Users(cfg.users_file) if cfg.users_file else None
        access = Access(users, tls=bool(cfg.tls_cert))
        server_config = uvicorn.Config(
            build_app(self.view, access), log_config=None, access_log=False, lifespan="on", loop="asyncio",
            http="h11", ws="none", server_header=False, timeout_graceful_shutdown=2,
            ssl_certfile=cfg.tls_cert or None, ssl_keyfile=cfg.tls_key or None)
        try:
            server_config.load()  # here, not in the thread: a bad certificate is a start-up error with its key
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"web.tls_cert = {cfg.tls_cert!r} / web.tls_key = {cfg.tls_key!r}: not a usable "
                              f"certificate and key ({getattr(exc, 'reason', None) or exc.strerror or exc}): "
                              "give a PEM certificate and its unencrypted key") from None
        self.view.sample(starting=True)  # the charts' base: the counters before this run delivers anything
        sock = self._sock = listen(cfg.address, cfg.port)
        self._server = uvicorn.Server(server_config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise ConfigError(f"web.port = {cfg.port} on {cfg.address}: the dashboard did not start (see the log "
                              "above): set web.port = 0 to run without it")
        mode = (f"{len(users.current())} user(s) in {cfg.users_file}" if users is not None
                else "read-only, overview only: no web.users_file")
        logger.info("dashboard at {} ({})", self.url, mode)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (open pages lose their connection) and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:  # uvicorn closed it when it ended; a server that never started had not
            self._sock.close()
        self._server, self._thread, self._sock = None, None, None
