"""Helpers for pipeline tests: configs pointing at real Orthanc servers, a daemon in-process, polling waits."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from loguru import logger

from relaypacsd.config import Config, build_config
from relaypacsd.daemon import Daemon
from relaypacsd.localorthanc import LocalOrthanc

FAST = {"retry_delay": 0.2, "retry_sweep_interval": 1.0, "health_interval": 1.0}


def pacs_table(server: LocalOrthanc, *, type: str = "orthanc", **extra: Any) -> dict[str, Any]:
    """A [pacs.NAME] table for a LocalOrthanc."""
    table: dict[str, Any] = {"type": type, "url": server.url, **extra}
    if server.auth and "username" not in extra:
        table["username"], table["password"] = server.auth
    return table


def make_config(root: Path, pacs: dict[str, dict[str, Any]], *, watch: dict[str, Any] | None = None,
                env: dict[str, str] | None = None, journal: dict[str, Any] | None = None, **delivery: Any) -> Config:
    """A validated Config with one watch root and fast timers (`journal`: its [journal] table, e.g. a url)."""
    raw: dict[str, Any] = {"daemon": {"state_dir": str(root / "state"), "heartbeat_interval": 1.0},
                           "delivery": {**FAST, **delivery},
                           "watch": [{"path": str(root / "spool"), "settle_seconds": 0.3, "poll_interval": 0.2,
                                      **(watch or {})}],
                           "pacs": pacs}
    if journal is not None:
        raw["journal"] = journal
    return build_config(raw, env or {})


@contextlib.contextmanager
def running(config: Config) -> Iterator[Daemon]:
    """A daemon started in this process, shut down gracefully at the end."""
    daemon = Daemon(config)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.shutdown(timeout=15)


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """Every loguru message emitted inside the block."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="DEBUG", format="{level} {message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll until predicate() is true or the timeout passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def files(root: Path, folder: str) -> list[Path]:
    """Files in one spool folder (sidecars and relaypacsd's own temp files excluded)."""
    base = root / "spool" / folder
    return sorted(p for p in base.rglob("*") if p.is_file() and not p.name.endswith(".error.json")
                  and not p.name.startswith(".relaypacs-"))


def leftovers(root: Path) -> list[Path]:
    """relaypacsd temp files and sidecars without their file anywhere in the spool."""
    base = root / "spool"
    return sorted(p for p in base.rglob("*") if p.is_file() and (
        p.name.startswith(".relaypacs-") or
        (p.name.endswith(".error.json") and not p.with_name(p.name[:-len(".error.json")]).exists())))
