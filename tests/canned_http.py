"""Local HTTP peers with canned answers (a real PACS will not give a 401 for an expired token on demand).

CannedServer plays the PACS, OAuthServer the token endpoint; the `canned` fixture is in tests/conftest.py.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

PASSWORD = "s3cr3t-Pa55-word"


@dataclass
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool
    reads: int = 0


@dataclass
class Answer:
    """A canned answer."""

    status: int = 200
    body: bytes | dict | list = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Responder = Callable[[Received], Answer]  # what CannedServer answers a request with


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def _read_body(self) -> tuple[bytes, bool, int]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out, reads = b"", 0
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                reads += 1
                if size == 0:
                    self.rfile.readline()
                    return out, True, reads
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0") or 0)
        out, reads = b"", 0
        while len(out) < length:
            piece = self.rfile.read1(min(65536, length - len(out)))  # type: ignore[attr-defined]
            if not piece:
                break
            out += piece
            reads += 1
        return out, False, reads

    def _serve(self) -> None:
        body, chunked, reads = self._read_body()
        rec = Received(self.command, self.path, dict(self.headers.items()), body, chunked, reads)
        server: CannedServer = self.server.owner  # type: ignore[attr-defined]
        server.received.append(rec)
        answer = server.respond(rec)
        if answer.delay:
            time.sleep(answer.delay)
        payload = answer.body
        headers = dict(answer.headers)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/dicom+json")
        try:
            self.send_response(answer.status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PUT = _serve
    # An idle keep-alive connection ends after this many seconds, so no handler thread outlives a test.
    timeout = 1


class CannedServer:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> whose answers come from `responder`."""

    def __init__(self, responder: Responder | None = None):
        self.responder = responder or (lambda rec: Answer())
        self.received: list[Received] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def respond(self, rec: Received) -> Answer:
        return self.responder(rec)

    def start(self) -> CannedServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class OAuthServer:
    """Token endpoint + resource: counts token requests; tokens can be revoked to force a 401."""

    def __init__(self, server: CannedServer, expires_in: int = 3600):
        self.server = server
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.token_requests: list[Received] = []
        self.lock = threading.Lock()
        server.responder = self.respond

    def respond(self, rec: Received) -> Answer:
        if rec.path == "/token":
            with self.lock:
                self.token_requests.append(rec)
                token = f"tok-{len(self.issued) + 1}"
                self.issued.append(token)
                self.valid.add(token)
            return Answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in},
                          headers={"Content-Type": "application/json"})
        auth = rec.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in self.valid:
            return Answer(200, {"ok": auth[7:]})
        return Answer(401, b"", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
