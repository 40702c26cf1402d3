"""What a private Orthanc is, before it runs: its ports, credentials and URLs, and the config it runs with.

relaypacsd.localorthanc runs it; the config holds the HTTP password, so it is written owner-only.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


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


class OrthancSetup:
    """A private Orthanc's settings, with its config, storage and log under `workdir`."""

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

    def write_config(self) -> Path:
        """Write config() to config_path, mode 0600: it holds the HTTP password."""
        write_private(self.config_path, json.dumps(self.config(), indent=2))
        return self.config_path
