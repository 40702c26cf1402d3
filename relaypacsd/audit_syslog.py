"""Audit messages to a syslog audit repository: RFC 5424 frames, octet-counted over TCP and TLS (RFC 6587,
RFC 5425), one datagram each over UDP (RFC 5426), sent by a background thread from a bounded queue.

A repository that is away never slows delivery: `submit` only appends to the queue (or, when the queue is
full, drops the message, counts it and warns once); the thread reconnects with a growing backoff and sends
what waited, oldest first. A message leaves the queue only once the socket took all of it.
"""

from __future__ import annotations

import collections
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Union
from urllib.parse import urlsplit

from loguru import logger

PRI = "<85>"  # facility 10 (security/authorization) * 8 + severity 5 (notice): PS3.15 A.6 / A.7
MSGID = "DICOM+RFC3881"  # PS3.15 A.6
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: a MSG in UTF-8 starts with it
UDP_MAX = 65507  # the largest IPv4 UDP payload: a bigger message cannot be sent as one datagram
BACKOFF_START, BACKOFF_MAX = 0.5, 10.0  # seconds between attempts while the repository is away
ACCEPT_WAIT = 0.5  # seconds a new TLS connection waits for a refusal of our certificate (see _accepted)

# A queued message: its bytes, or a function that makes them (rendered in the sender thread, not the caller's).
Message = Union[bytes, Callable[[], bytes]]


@dataclass
class AuditCounters:
    """Audit messages sent and dropped since the daemon started (kept across reloads, for the metrics)."""

    sent: int = 0
    dropped: int = 0


SYSLOG_SCHEMES = {"tcp": 514, "udp": 514, "tls": 6514}  # and their default ports (RFC 6587, 5426, 5425)


def syslog_target(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an [audit] syslog URL; ValueError saying what is wrong (config.py says it as a
    ConfigError)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SYSLOG_SCHEMES:
        raise ValueError("must start with tcp://, udp:// or tls://")
    try:
        parts = urlsplit(f"{scheme.lower()}://{rest}")
    except ValueError:
        raise ValueError("not a valid URL (an IPv6 address goes in brackets)") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("only a host and a port belong in it")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if not parts.hostname:
        raise ValueError("no host name")
    return parts.scheme, parts.hostname, SYSLOG_SCHEMES[parts.scheme] if port is None else port


def tls_context(ca_bundle: str, client_cert: str, client_key: str) -> ssl.SSLContext:
    """TLS 1.2 or later (PS3.15 A.6), the repository's certificate checked against `ca_bundle` (a PEM file or a
    hashed folder; the system's CAs when empty), ours offered when configured (mutual TLS)."""
    if ca_bundle and os.path.isdir(ca_bundle):
        context = ssl.create_default_context(capath=ca_bundle)
    else:
        context = ssl.create_default_context(cafile=ca_bundle or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert:
        context.load_cert_chain(client_cert, client_key or None)
    return context


def header_field(text: str, limit: int) -> str:
    """A HEADER field of RFC 5424: printable US-ASCII without spaces, at most `limit` characters, or '-'."""
    clean = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return clean or "-"


def frame(message: bytes, *, hostname: str, app_name: str, procid: str, when: float) -> bytes:
    """One SYSLOG-MSG (RFC 5424 6): HEADER, no STRUCTURED-DATA, and the message after a BOM."""
    stamp = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    head = (f"{PRI}1 {stamp} {header_field(hostname, 255)} {header_field(app_name, 48)} "
            f"{header_field(procid, 128)} {MSGID} - ")
    return head.encode("ascii") + BOM + message


def octet_counted(syslog_msg: bytes) -> bytes:
    """The TCP/TLS framing of RFC 5425 4.3 (and RFC 6587 3.4.1): MSG-LEN SP SYSLOG-MSG."""
    return str(len(syslog_msg)).encode("ascii") + b" " + syslog_msg


class SyslogSender:
    """One audit repository: a bounded queue and the thread that empties it into a socket."""

    def __init__(self, url: str, *, ca_bundle: str = "", client_cert: str = "", client_key: str = "",
                 queue_size: int = 10000, counters: AuditCounters | None = None, app_name: str = "relaypacsd",
                 hostname: str | None = None, timeout: float = 5.0, backoff_max: float = BACKOFF_MAX):
        self.url = url
        self.scheme, self.host, self.port = syslog_target(url)
        self.counters = counters if counters is not None else AuditCounters()
        self._tls = tls_context(ca_bundle, client_cert, client_key) if self.scheme == "tls" else None
        self._queue: collections.deque[Message] = collections.deque()
        self._size = queue_size
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline = float("inf")  # once stopping: when the last send may start
        self._wake = threading.Event()  # ends a backoff early at stop()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._app, self._host, self._pid = app_name, hostname or socket.gethostname(), str(os.getpid())
        self._timeout, self._backoff_max = timeout, backoff_max
        self._down_since: float | None = None  # the repository is away: one warning, one line when back
        self._full_warned = False
        self._dropped_at_down = 0

    # -- the caller's side (any thread) ---------------------------------------------------------------------

    def submit(self, message: Message) -> bool:
        """Queue one message (bytes, or a function rendering them in the sender thread); never blocks.
        False when the queue is full: the message is dropped and counted, with one warning per episode."""
        with self._cond:
            if len(self._queue) >= self._size or self._stopping:
                self.counters.dropped += 1
                warn, self._full_warned = not self._full_warned, True
            else:
                self._queue.append(message)
                self._cond.notify()
                return True
        if warn:
            logger.warning("audit: the queue for {} is full ({} messages): further audit messages are dropped and "
                           "counted until the repository takes the queued ones", self.url, self._size)
        return False

    def pending(self) -> int:
        """Messages queued, not yet sent."""
        with self._cond:
            return len(self._queue)

    def start(self) -> None:
        """Start the sender thread."""
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued for up to `timeout` s, then stop; what is left is dropped and counted."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + self._timeout + 1)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
            self.counters.dropped += left
        if left:
            logger.warning("audit: {} audit message(s) not sent at stop: {} did not take them in time", left, self.url)
        self._close()

    def probe(self) -> str:
        """Connect once (TCP, with the TLS handshake for tls://) and close; what was reached, or OSError.
        For `relaypacsd check`; UDP has no connection to test."""
        sock = self._connect()
        try:
            return (sock.version() or "TLS") if isinstance(sock, ssl.SSLSocket) else "connected"
        finally:
            sock.close()

    # -- the sender thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_START
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue or time.monotonic() >= self._deadline:
                    return
                message = self._queue[0]
            try:
                data = self._framed(message)
            except Exception:  # a bug in a message must not stop the audit trail
                logger.exception("audit: a message could not be rendered; dropped")
                self._pop(sent=False, dropped=True)
                continue
            if data is None:
                self._pop(sent=False)
                continue
            try:
                self._send(data)
            except OSError as exc:  # ssl.SSLError is one too
                self._close()
                self._went_down(exc)
                if self._stopping:
                    return  # no backoff at stop: what is left is counted as dropped
                self._wake.wait(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            backoff = BACKOFF_START
            self._pop(sent=True)
            self._came_back()

    def _framed(self, message: Message) -> bytes | None:
        """The bytes for the wire, or None for a message too big for UDP (dropped). The rendered message replaces
        the function at the head of the queue, so a resend after an outage does not render it again."""
        body = message if isinstance(message, bytes) else message()
        with self._cond:
            if self._queue and self._queue[0] is message:
                self._queue[0] = body
        data = frame(body, hostname=self._host, app_name=self._app, procid=self._pid, when=time.time())
        if self.scheme != "udp":
            return octet_counted(data)
        if len(data) > UDP_MAX:
            with self._cond:
                self.counters.dropped += 1
            logger.warning("audit: a {}-byte message does not fit one UDP datagram; dropped (use tcp:// or tls://)",
                           len(data))
            return None
        return data

    def _pop(self, sent: bool, dropped: bool = False) -> None:
        with self._cond:
            self._queue.popleft()
            self.counters.sent += sent
            self.counters.dropped += dropped
            if not self._queue:
                self._full_warned = False  # the next overflow is a new episode: it warns again

    def _send(self, data: bytes) -> None:
        if self._sock is not None and self.scheme != "udp" and self._peer_closed(self._sock):
            self._close()  # the repository closed it (a restart): a send would vanish into the dead connection
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.send(data)
        else:
            self._sock.sendall(data)

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.connect(address)  # a connected socket hears the ICMP "port unreachable" of a repository away
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=self._timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
                self._accepted(sock)
            except BaseException:
                sock.close()
                raise
        return sock

    def _accepted(self, sock: ssl.SSLSocket) -> None:
        """Wait a moment for the repository's verdict on our certificate: in TLS 1.3 a refusal comes after our
        side of the handshake has finished, and a message written before it would be lost without a trace."""
        sock.settimeout(ACCEPT_WAIT)
        try:
            if sock.recv(1) == b"":
                raise ConnectionResetError("the repository closed the connection after the TLS handshake: does it "
                                           "want our certificate? set [audit] client_cert and client_key")
        except (TimeoutError, ssl.SSLWantReadError):
            pass  # nothing came: it took us
        finally:
            sock.settimeout(self._timeout)

    def _peer_closed(self, sock: socket.socket) -> bool:
        """True when the repository has closed the connection (it never sends anything else)."""
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        except (BlockingIOError, ssl.SSLWantReadError):
            return False  # nothing to read: alive (or a TLS 1.3 session ticket, now taken)
        except OSError:
            return True
        finally:
            try:
                sock.settimeout(self._timeout)
            except OSError:
                pass

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _went_down(self, exc: OSError) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._dropped_at_down = self.counters.dropped
            logger.warning("audit: repository {} unreachable ({}): audit messages wait in a queue of up to {}; "
                           "delivery goes on", self.url, exc.strerror or exc, self._size)

    def _came_back(self) -> None:
        if self._down_since is not None:
            away = time.monotonic() - self._down_since
            self._down_since = None
            logger.info("audit: repository {} reachable again after {:.0f} s; {} message(s) still queued, {} dropped "
                        "meanwhile", self.url, away, self.pending(), self.counters.dropped - self._dropped_at_down)
