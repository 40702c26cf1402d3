"""The private Orthanc itself: auth, loopback-only listeners, STOW-RS storage, reset, second layout, stop."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from relaypacsd import localorthanc, loopback
from relaypacsd.localorthanc import LocalOrthanc, OrthancStartError
from tests.dicomfactory import write_instance

DCM4CHEE_ROOT = "/dcm4chee-arc/aets/DCM4CHEE/rs/"


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        p = Path(table)
        if not p.exists():
            continue
        for line in p.read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":
                found.append(addr)
    return found


def stow(url: str, files: list[Path], auth: tuple[str, str] | None) -> requests.Response:
    """STOW-RS with a multipart/related body built by hand."""
    boundary = "XYZ"
    body = b""
    for f in files:
        body += (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + f.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    return requests.post(url + "/studies", data=body, headers=headers, auth=auth, timeout=30)


def test_system_needs_auth(orthanc: LocalOrthanc) -> None:
    assert orthanc.auth is not None and orthanc.auth[0] == "relaypacs"
    ok = requests.get(orthanc.url + "/system", auth=orthanc.auth, timeout=10)
    assert ok.status_code == 200
    assert ok.json()["DicomAet"] == orthanc.aet
    assert ok.json()["DicomPort"] == orthanc.dicom_port
    assert requests.get(orthanc.url + "/system", timeout=10).status_code == 401
    assert requests.get(orthanc.url + "/system", auth=("relaypacs", "wrong"), timeout=10).status_code == 401


def test_listens_on_loopback_only(orthanc: LocalOrthanc) -> None:
    for port in (orthanc.http_port, orthanc.dicom_port):
        found = listeners(port)
        assert found, f"nothing listens on {port}"
        # 127.0.0.1 in /proc/net/tcp, ::1 in /proc/net/tcp6; never 0.0.0.0 or ::.
        assert set(found) <= {"0100007F", "00000000000000000000000001000000"}, found


def test_loopback_check_refuses_wildcard(orthanc: LocalOrthanc, monkeypatch: pytest.MonkeyPatch) -> None:
    # The start-up check itself, fed a fake wildcard listener (a real one would break the loopback rule).
    monkeypatch.setattr(loopback, "listening_sockets",
                        lambda: [("00000000", orthanc.dicom_port, "1"), ("0100007F", orthanc.http_port, "2")])
    with pytest.raises(OrthancStartError, match="not loopback"):
        orthanc._verify_loopback_only()


def test_stow_stores_and_reset_empties(clean_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    assert clean_orthanc.count_instances() == 0
    sop = write_instance(tmp_path / "one.dcm")
    r = stow(clean_orthanc.dicomweb_url, [tmp_path / "one.dcm"], clean_orthanc.auth)
    assert r.status_code == 200, r.text
    referenced = r.json()["00081199"]["Value"]
    assert [item["00081155"]["Value"][0] for item in referenced] == [sop]
    assert clean_orthanc.list_instance_uids() == {sop}
    assert clean_orthanc.count_instances() == 1

    clean_orthanc.reset()
    assert clean_orthanc.count_instances() == 0
    assert clean_orthanc.list_instance_uids() == set()


def test_stow_without_auth_is_refused(clean_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    write_instance(tmp_path / "one.dcm")
    assert stow(clean_orthanc.dicomweb_url, [tmp_path / "one.dcm"], None).status_code == 401
    assert clean_orthanc.count_instances() == 0


def test_factory_dcm4chee_layout_without_auth(orthanc_factory: Callable[..., LocalOrthanc], tmp_path: Path) -> None:
    other = orthanc_factory(username=None, dicomweb_root=DCM4CHEE_ROOT)
    assert other.auth is None
    assert other.dicomweb_url == other.url + "/dcm4chee-arc/aets/DCM4CHEE/rs"
    empty = requests.get(other.dicomweb_url + "/studies", timeout=10)
    assert empty.status_code == 200 and empty.json() == []

    sop = write_instance(tmp_path / "one.dcm")
    assert stow(other.dicomweb_url, [tmp_path / "one.dcm"], None).status_code == 200
    found = requests.get(other.dicomweb_url + "/studies", timeout=10).json()
    assert len(found) == 1
    assert other.list_instance_uids() == {sop}
    # The default root is not served by this one.
    assert requests.get(other.url + "/dicom-web/studies", timeout=10).status_code == 404


def test_context_manager_fixed_ports_and_stop(tmp_path: Path) -> None:
    http, dicom = localorthanc.free_port(), localorthanc.free_port()
    started = time.monotonic()
    with LocalOrthanc(tmp_path / "o", http_port=http, dicom_port=dicom, username=None) as o:
        assert time.monotonic() - started < 5
        assert (o.http_port, o.dicom_port) == (http, dicom)
        assert requests.get(o.url + "/system", timeout=10).json()["HttpPort"] == http
        pid = o.pid
        assert pid is not None and o.is_running()
    # __exit__ is stop(): SIGTERM and wait (Orthanc 1.10 needs ~3.5 s to stop).
    assert not o.is_running()
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie
    assert listeners(http) == [] and listeners(dicom) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(o.url + "/system", timeout=2)
    assert "Orthanc has stopped" in o.log_path.read_text()  # a clean stop, not a SIGKILL
    o.stop()  # idempotent
