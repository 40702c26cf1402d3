"""Start and stop a private, loopback-only Orthanc (with the DICOMweb plugin) for tests, benchmarks and the demo.

Orthanc 1.10 binds 0.0.0.0 and has no bind-address setting, so the process is started with an
LD_PRELOAD shim that rewrites wildcard binds to loopback, and the listening sockets are checked in
/proc/net/tcp after start: a private test server must never be reachable from the network.
"""

from __future__ import annotations

import json
import os
import secrets
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

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
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


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), atomically: no moment where others may read it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have been left by an earlier run with a wider mode
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class LocalOrthanc:
    """A private Orthanc + DICOMweb on 127.0.0.1, with its config, storage and log under `workdir`."""

    def __init__(self, workdir: Path, *, http_port: int | None = None, dicom_port: int | None = None,
                 username: str | None = "relaypacs", password: str | None = None,
                 dicomweb_root: str = "/dicom-web/", aet: str = "ORTHANC",
                 extra: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self._fixed_ports = http_port is not None or dicom_port is not None
        self._http_port = http_port
        self._dicom_port = dicom_port
        self.username = username
        self.password = password if password is not None else secrets.token_urlsafe(16)
        if not dicomweb_root.startswith("/") or dicomweb_root.strip("/") == "":
            # A root of "/" makes the plugin fail and Orthanc exit (measured); say so early.
            raise ValueError(f"dicomweb_root must be a non-root absolute path, not {dicomweb_root!r}")
        self.dicomweb_root = dicomweb_root if dicomweb_root.endswith("/") else dicomweb_root + "/"
        self._aet = aet
        self.extra = dict(extra or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: requests.Session | None = None

    # --- properties -------------------------------------------------------------------------

    @property
    def http_port(self) -> int:
        """HTTP port (chosen at start when not given)."""
        if self._http_port is None:
            raise RuntimeError("ports are chosen at start(); start Orthanc first")
        return self._http_port

    @property
    def dicom_port(self) -> int:
        """DICOM (C-STORE) port (chosen at start when not given)."""
        if self._dicom_port is None:
            raise RuntimeError("ports are chosen at start(); start Orthanc first")
        return self._dicom_port

    @property
    def aet(self) -> str:
        """Orthanc's own AE title."""
        return self._aet

    @property
    def ssl(self) -> bool:
        """True when `extra` turned on HTTPS.

        Caution: Orthanc 1.10.1 (Debian 12) segfaulted on the first HTTPS request here; start() then fails.
        """
        return bool(self.extra.get("SslEnabled"))

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. http://127.0.0.1:18042."""
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """(user, password) for HTTP basic auth, or None when authentication is off."""
        return (self.username, self.password) if self.username is not None else None

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb base URL without trailing slash (honours a DicomWeb.Root given in `extra`)."""
        root = self.extra.get("DicomWeb", {}).get("Root", self.dicomweb_root)
        return self.url + "/" + root.strip("/")

    @property
    def log_path(self) -> Path:
        """Orthanc's stderr (its log)."""
        return self.workdir / "orthanc.log"

    @property
    def config_path(self) -> Path:
        """The private JSON config written at start."""
        return self.workdir / "orthanc.json"

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._proc.pid if self._proc is not None else None

    # --- lifecycle --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration this instance runs with."""
        db = self.workdir / "db"
        # WADO-URI next to the DICOMweb root, as dcm4chee lays it out: /a/b/rs/ -> /a/b/wado.
        parent = self.dicomweb_root.rstrip("/").rsplit("/", 1)[0]
        wado_root = parent + "/wado"
        cfg: dict[str, Any] = {
            "Name": f"relaypacsd-test-{self.http_port}",
            "StorageDirectory": str(db), "IndexDirectory": str(db),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.username is not None,
            "RegisteredUsers": {self.username: self.password} if self.username is not None else {},
            "HttpDescribeErrors": True, "StorageCompression": False, "SyncStorageArea": False,
            "HttpTimeout": 60, "DicomScpTimeout": 30,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "ConcurrentJobs": 2, "SaveJobs": False, "StableAge": 1,
            "DicomWeb": {"Enable": True, "Root": self.dicomweb_root, "EnableWado": True,
                         "WadoRoot": wado_root, "Ssl": self.ssl},
        }
        for key, value in self.extra.items():
            # One level of merge so that e.g. {"DicomWeb": {"Root": ...}} keeps the other plugin keys.
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

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

    def write_config(self) -> Path:
        """Write config() to config_path, mode 0600: it holds the HTTP password."""
        write_private(self.config_path, json.dumps(self.config(), indent=2))
        return self.config_path

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
