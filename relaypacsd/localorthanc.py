"""Start and stop a private, loopback-only Orthanc (with the DICOMweb plugin) for tests, benchmarks and the demo.

Orthanc 1.10 binds 0.0.0.0 and has no bind-address setting, so the process is started with an
LD_PRELOAD shim that rewrites wildcard binds to loopback, and the listening sockets are checked in
/proc/net/tcp after start: a private test server must never be reachable from the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "apt-get install -y orthanc orthanc-dicomweb"

# Orthanc exits with this code when a port is privileged or already in use (measured on 1.10.1).
_EXIT_PORT_IN_USE = 255
_LISTEN = "0A"
_LOOPBACK_V4 = "0100007F"
_LOOPBACK_V6 = "00000000000000000000000001000000"

SHIM_SOURCE = r"""
/* LD_PRELOAD shim: turn wildcard binds into loopback binds (Orthanc has no bind-address setting). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = 0;
    if (!real_bind) {
        real_bind = (bind_fn) dlsym(RTLD_NEXT, "bind");
        if (!real_bind) { errno = ENOSYS; return -1; }
    }
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t) sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *) &a, sizeof a);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t) sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr) == 0) {
            a.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *) &a, sizeof a);
        }
    }
    return real_bind(fd, addr, len);
}
"""


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


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "relaypacsd"


def loopback_shim(fallback_dir: Path | None = None) -> Path:
    """Path of the compiled bind() shim; compiled once per source version into the cache dir."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    name = f"loopback-bind-{digest}.so"
    dirs = [_cache_dir()] + ([fallback_dir] if fallback_dir else [])
    for d in dirs:
        if (d / name).is_file():
            return d / name
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        # Running without the shim would expose the server on every interface: refuse instead.
        raise OrthancNotInstalled(
            "no C compiler (cc/gcc) found: it is needed to build the shim that keeps the private "
            "Orthanc on 127.0.0.1; install one with: apt-get install -y gcc")
    last_error = ""
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                src = Path(tmp) / "shim.c"
                src.write_text(SHIM_SOURCE)
                out = Path(tmp) / name
                res = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    raise OrthancNotInstalled(f"compiling the loopback shim failed: {res.stderr.strip()}")
                # Atomic rename: concurrent test workers may race to build the same file.
                os.replace(out, d / name)
            return d / name
        except OSError as e:
            last_error = str(e)
    raise OrthancStartError(f"cannot write the loopback shim anywhere ({last_error})")


def _listening_sockets() -> list[tuple[str, int, str]]:
    """(local address hex, port, socket inode) of every listening TCP socket in this namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            addr, port = f[1].split(":")
            if f[3] == _LISTEN:
                found.append((addr, int(port, 16), f[9]))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


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
        shim = loopback_shim(fallback_dir=self.workdir)
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
        ours = _socket_inodes(self._proc.pid)
        ports = {self.http_port, self.dicom_port}
        seen: set[int] = set()
        for addr, port, inode in _listening_sockets():
            if port not in ports:
                continue
            if addr not in (_LOOPBACK_V4, _LOOPBACK_V6):
                raise OrthancStartError(f"port {port} listens on {addr} (not loopback): refusing to run")
            if inode in ours:
                seen.add(port)
        if seen != ports:
            # Orthanc opens its DICOM port before HTTP, so both must be there once /system answers.
            raise OrthancStartError(f"Orthanc does not listen on 127.0.0.1 for {sorted(ports - seen)}:\n"
                                    f"{self.log_tail()}")

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
