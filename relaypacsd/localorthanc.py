"""Start and stop a private, loopback-only Orthanc (with the DICOMweb plugin) for tests, benchmarks and the demo.

Orthanc 1.10 binds 0.0.0.0 and has no bind-address setting, so the process is started with an
LD_PRELOAD shim that rewrites wildcard binds to loopback, and the listening sockets are checked in
/proc/net/tcp after start: a private test server must never be reachable from the network. What it runs
with (ports, credentials, URLs, its config file) is relaypacsd.orthanc_setup's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from relaypacsd import loopback
from relaypacsd.loopback import loopback_shim  # noqa: F401  (the tests' and benchmark's import path)
from relaypacsd.orthanc_setup import DICOMWEB_PLUGIN, OrthancSetup, write_private

# Names the tests, benchmark and demo import from here, write_private now living in orthanc_setup.
__all__ = ["LocalOrthanc", "OrthancNotInstalled", "OrthancStartError", "free_port", "write_private", "loopback_shim",
           "ORTHANC_BINARY", "DICOMWEB_PLUGIN", "INSTALL_HINT"]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
INSTALL_HINT = "apt-get install -y orthanc orthanc-dicomweb"

# Orthanc exits with this code when a port is privileged or already in use (measured on 1.10.1).
_EXIT_PORT_IN_USE = 255


class OrthancNotInstalled(RuntimeError):
    """The Orthanc binary or its DICOMweb plugin is missing."""


class OrthancStartError(RuntimeError):
    """Orthanc did not come up (or came up listening beyond loopback); the message quotes its log."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalOrthanc(OrthancSetup):
    """A private Orthanc + DICOMweb on 127.0.0.1, with its config, storage and log under `workdir`."""

    # OrthancSetup's __init__ is the constructor: the process and its REST session exist only while running.
    _proc: subprocess.Popen[bytes] | None = None
    _session: requests.Session | None = None

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._proc.pid if self._proc is not None else None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 20) -> "LocalOrthanc":
        """Start Orthanc and wait until GET /system answers 200; verify it listens on loopback only."""
        if self.is_running():
            return self
        if not ORTHANC_BINARY.exists() or not DICOMWEB_PLUGIN.exists():
            missing = ORTHANC_BINARY if not ORTHANC_BINARY.exists() else DICOMWEB_PLUGIN
            raise OrthancNotInstalled(f"{missing} not found; install it with: {INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            shim = loopback_shim(fallback_dir=self.workdir)
        except loopback.LoopbackUnavailable as exc:
            raise OrthancNotInstalled(str(exc)) from None
        deadline = time.monotonic() + timeout
        attempts = 1 if self._fixed_ports else 5
        for attempt in range(attempts):
            if not self._fixed_ports:
                self._http_port, self._dicom_port = self._two_free_ports()
            elif self._http_port is None or self._dicom_port is None:
                self._http_port = self._http_port or free_port()
                self._dicom_port = self._dicom_port or free_port()
            code = self._launch(shim, deadline)
            if code is None:
                break
            # Another process grabbed a port between free_port() and Orthanc's bind: pick again.
            if code == _EXIT_PORT_IN_USE and attempt + 1 < attempts and time.monotonic() < deadline:
                continue
            raise OrthancStartError(f"Orthanc exited with code {code} at start "
                                    f"(http {self._http_port}, dicom {self._dicom_port}):\n{self.log_tail()}")
        try:
            self._verify_loopback_only()
        except Exception:
            self.stop()
            raise
        return self

    @staticmethod
    def _two_free_ports() -> tuple[int, int]:
        a = free_port()
        b = free_port()
        while b == a:
            b = free_port()
        return a, b

    def _launch(self, shim: Path, deadline: float) -> int | None:
        """Run Orthanc once; None when ready, else its exit code."""
        self.write_config()
        env = dict(os.environ)
        # DCMTK leaves Nagle on unless told: ~10x slower C-STORE on loopback (measured).
        env["TCP_NODELAY"] = "1"
        env["LD_PRELOAD"] = " ".join(p for p in (str(shim), env.get("LD_PRELOAD", "")) if p)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([str(ORTHANC_BINARY), str(self.config_path)], env=env,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          cwd=self.workdir, start_new_session=True)
        delay = 0.01
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                return code
            try:
                if self._request("GET", "/system", timeout=2).status_code == 200:
                    return None
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise OrthancStartError(f"Orthanc did not answer GET /system in time:\n{tail}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def _verify_loopback_only(self) -> None:
        """Raise unless each of our two ports has a listener and every listener on them is on loopback."""
        assert self._proc is not None
        try:
            # Orthanc opens its DICOM port before HTTP, so both must be there once /system answers.
            loopback.check_listening(self._proc.pid, {self.http_port, self.dicom_port})
        except loopback.NotOnLoopback as exc:
            raise OrthancStartError(f"{exc}:\n{self.log_tail()}") from None

    def terminate(self) -> None:
        """Send SIGTERM without waiting: Orthanc needs ~3 s to stop, so stop several in parallel."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL."""
        proc, self._proc = self._proc, None
        if self._session is not None:
            self._session.close()
            self._session = None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def is_running(self) -> bool:
        """True while the Orthanc process lives."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "LocalOrthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Orthanc's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- REST helpers for tests -------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        if self._session is None:
            self._session = requests.Session()
            self._session.auth = self.auth
            # Admin calls only, on loopback: a self-signed test certificate must not stop them.
            self._session.verify = False
            # Orthanc closes idle keep-alive connections after a second: a GET that reuses one as it closes
            # fails with "Remote end closed connection"; retried once (idempotent methods only, never POST).
            retry = Retry(total=2, connect=2, read=1, status=0, backoff_factor=0.1)
            self._session.mount("http://", HTTPAdapter(max_retries=retry))
            self._session.mount("https://", HTTPAdapter(max_retries=retry))
        kwargs.setdefault("timeout", 30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._session.request(method, self.url + path, **kwargs)

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call Orthanc's REST API with our credentials; the decoded JSON answer (raises on HTTP errors)."""
        r = self._request(method, path, **kwargs)
        r.raise_for_status()
        return r.json() if r.content else None

    def count_instances(self) -> int:
        """Number of instances stored."""
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def list_instance_uids(self) -> set[str]:
        """SOPInstanceUIDs of every stored instance."""
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.rest("GET", "/instances?expand")}

    def reset(self) -> None:
        """Delete everything stored."""
        for patient in self.rest("GET", "/patients"):
            self._request("DELETE", f"/patients/{patient}")
