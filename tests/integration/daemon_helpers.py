"""Helpers for tests that run the real daemon: `relaypacsd run` as a subprocess with a config in tmp_path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import tomli_w

# Variables of the operators' environment that would change the daemon's config behind the test's back.
_SCRUB_PREFIXES = ("ORTHANC_", "DCM4CHEE_", "PACS_", "NOTIFY_SOCKET", "WATCHDOG_")
_SCRUB = ("ACTIVE_PACS", "RELAYPACS_CONFIG")


def config_dict(tmp_path: Path, orthanc: Any = None, **overrides: Any) -> dict[str, Any]:
    """A fast test config: spool at tmp_path/spool, state at tmp_path/state, log file at tmp_path/logs.

    `orthanc` (a LocalOrthanc) becomes [pacs.orthanc]. Overrides are merged per section:
    daemon={...}, delivery={...}, watch={...} (merged into the first root) or watch=[{...}, ...] (replaces),
    pacs={...} (merged into [pacs.orthanc]) or pacs_tables={name: {...}} (replaces every PACS).
    """
    doc: dict[str, Any] = {
        "daemon": {"state_dir": str(tmp_path / "state"), "heartbeat_interval": 1.0, "log_level": "INFO",
                   "log_file": str(tmp_path / "logs" / "relaypacsd.log")},
        "delivery": {"retry_sweep_interval": 1.0, "health_interval": 1.0, "retry_delay": 0.2,
                     "retry_backoff_max": 2.0, "workers_per_pacs": 2},
        "watch": [{"path": str(tmp_path / "spool"), "settle_seconds": 0.3, "poll_interval": 0.3,
                   "rescan_interval": 1.0}],
        "pacs": {},
    }
    if orthanc is not None:
        user, password = orthanc.auth or ("", "")
        doc["pacs"]["orthanc"] = {"type": "orthanc", "url": orthanc.url, "username": user, "password": password,
                                  "connect_timeout": 2.0, "read_timeout": 30.0}
    for key, value in overrides.items():
        if key == "watch" and isinstance(value, list):
            doc["watch"] = value
        elif key == "watch":
            doc["watch"][0].update(value)
        elif key == "pacs":
            doc["pacs"]["orthanc"].update(value)
        elif key == "pacs_tables":
            doc["pacs"] = value
        else:
            doc.setdefault(key, {}).update(value)
    return doc


def write_config(tmp_path: Path, orthanc: Any = None, *, path: Path | None = None, **overrides: Any) -> Path:
    """Write config_dict(...) as TOML (default tmp_path/relaypacs.toml, mode 0600) and return its path."""
    path = path or tmp_path / "relaypacs.toml"
    doc = config_dict(tmp_path, orthanc, **overrides)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(doc))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # atomic: a SIGHUP never reads half a file
    return path


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without the operators' relaypacsd variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB}
    env.update(extra or {})
    return env


def start_daemon(cfg_path: Path, env: dict[str, str] | None = None, *args: str,
                 log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m relaypacsd -c CFG run`; stdout and stderr go to `log` (default: beside the config).

    The log path is kept as `proc.log_path` (read it with `daemon_log(proc)`).
    """
    n = 0
    if log is None:
        while (cfg_path.parent / f"daemon-{n}.log").exists():
            n += 1
        log = cfg_path.parent / f"daemon-{n}.log"
    fh = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "relaypacsd", "-c", str(cfg_path), "run", *args],
                            stdout=fh, stderr=subprocess.STDOUT, env=daemon_env(env), cwd=cfg_path.parent)
    fh.close()
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def daemon_log(proc: subprocess.Popen[bytes]) -> str:
    """Everything the daemon printed so far."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1,
             message: str | Callable[[], str] = "") -> Any:
    """Poll until predicate() is truthy and return its value; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {getattr(predicate, '__name__', 'it')}"
                                 + (f": {text}" if text else ""))
        time.sleep(interval)


def wait_ready(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Wait for the daemon's "relaypacsd ready" log line; fail with its log if it exits first."""
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"relaypacsd exited with {proc.returncode} before it was ready:\n{daemon_log(proc)}")
        return "relaypacsd ready" in daemon_log(proc)

    wait_for(ready, timeout, message=lambda: daemon_log(proc)[-3000:])


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 40.0, sig: int = signal.SIGTERM) -> int:
    """Send `sig` (SIGTERM) and wait; SIGKILL after `timeout` s. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def files_in(root: Path, folder: str) -> list[Path]:
    """Regular files below root/folder, sidecars (*.error.json) excluded, sorted."""
    base = root / folder
    if not base.exists():
        return []
    return sorted(p for p in base.rglob("*") if p.is_file() and not p.name.endswith(".error.json")
                  and not p.name.startswith("."))


def count_in(root: Path, *folders: str) -> int:
    """How many files are in the given folders of a watch root."""
    return sum(len(files_in(root, f)) for f in folders)


def log_files(*dirs: Path) -> list[Path]:
    """Every log the daemons of a test wrote below `dirs` (daemon-*.log captures, log_file sinks, rotations)."""
    found: list[Path] = []
    for d in dirs:
        found += [p for p in Path(d).rglob("*") if p.is_file() and ".log" in p.name]
    return sorted(set(found))


def assert_no_secrets(paths: Iterable[Path], secrets: Iterable[str]) -> None:
    """No log contains any of the secrets (plain text)."""
    secrets = [s for s in secrets if s]
    paths = list(paths)
    assert paths, "no log files to check"
    for path in paths:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a password appears in {path}"
