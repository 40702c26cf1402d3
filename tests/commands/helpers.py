"""Shared bits of the command tests: a config file for a (real or fake) PACS."""

from __future__ import annotations

import os
from pathlib import Path

import tomli_w


def write_config(tmp: Path, *, url: str, username: str = "", password: str = "", dicom_port: int = 0,
                 ae_title: str = "", fallback: str = "", extra_pacs: dict | None = None, name: str = "orthanc") -> Path:
    """A relaypacs.toml with one watch root and one PACS (more with extra_pacs)."""
    pacs: dict = {"type": "orthanc", "url": url, "connect_timeout": 2.0, "read_timeout": 30.0}  # heavy load may slow an answer
    if username:
        pacs.update(username=username, password=password)
    if dicom_port:
        pacs.update(dicom_host="127.0.0.1", dicom_port=dicom_port, ae_title=ae_title or "ORTHANC")
    if fallback:
        pacs["fallback"] = fallback
    raw = {"daemon": {"state_dir": str(tmp / "state")},
           "delivery": {"retry_attempts": 2, "retry_delay": 0.05},
           "watch": [{"path": str(tmp / "spool")}],
           "pacs": {name: pacs, **(extra_pacs or {})}}
    path = tmp / "relaypacs.toml"
    path.write_bytes(tomli_w.dumps(raw).encode())
    return path


def clean_env() -> dict[str, str]:
    """The environment without operator variables that would override the test's config."""
    drop = ("ORTHANC_", "DCM4CHEE_", "ACTIVE_PACS", "PACS_", "RELAYPACS_CONFIG")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
