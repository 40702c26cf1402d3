"""systemd's notify protocol without libsystemd: datagrams to $NOTIFY_SOCKET (sd_notify(3)).

Every function is a no-op when NOTIFY_SOCKET is unset (run by hand, in Docker), so callers never check.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping

from loguru import logger


class Notifier:
    """Sends READY=1, STATUS=..., WATCHDOG=1, RELOADING=1, STOPPING=1 to the service manager."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned = False
        self._next_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (NOTIFY_SOCKET set)."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of newline-separated KEY=VALUE fields; False if it could not be sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
            return True
        except OSError as exc:
            if not self._warned:  # one line, not one per heartbeat
                logger.warning("cannot notify the service manager at NOTIFY_SOCKET: {}", exc)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        """The service is up: systemd finishes `systemctl start` (Type=notify)."""
        return self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Reset the watchdog timer (WatchdogSec=): send only while the daemon is really alive."""
        return self.send("WATCHDOG=1")

    def feed_watchdog(self, alive: Callable[[], bool]) -> None:
        """Send WATCHDOG=1 when one is due and `alive()` (asked only then: it checks every thread)."""
        now = time.monotonic()
        if self.watchdog_interval and now >= self._next_watchdog and alive():
            self.watchdog()
            self._next_watchdog = now + self.watchdog_interval

    def reloading(self) -> bool:
        """A reload (SIGHUP) has begun; READY=1 follows when it is done (MONOTONIC_USEC: systemd 253+)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace: a leading NUL byte
    if value.startswith("/"):
        return value
    return None  # systemd also allows vsock:..., which a service on this host never gets


def _watchdog_interval(env: Mapping[str, str]) -> float:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or 0 when no watchdog is set for us."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0.0
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return 0.0
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    return " ".join(text.split())
