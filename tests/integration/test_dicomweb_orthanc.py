"""relaypacsd.dicomweb against the real Orthanc 1.10 + DICOMweb plugin (fixtures in conftest.py).

TLS: Orthanc 1.10.1 on Debian 12 segfaults on the first HTTPS request (measured: with and without
the DICOMweb plugin, TLS 1.2 and 1.3, any client), so HTTPS is tested the way hospitals often run
it: the real Orthanc behind a TLS terminator (here a small Python one, certificates by `openssl`).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaypacsd.config import PacsConfig, Secret
from relaypacsd.dicomweb import DicomWebClient
from relaypacsd.errors import DestinationProblem, PacsError, PacsUnreachable
from relaypacsd.localorthanc import LocalOrthanc, free_port
from relaypacsd.models import Part
from relaypacsd.outcomes import Outcome
from tests.dicomfactory import MR_SMALL, MR_TRUNCATED, write_instance, write_study
from tests.integration.pacs_helpers import STORE_ONLY_FILTER, pacs_for


def stow_part(path: Path, uid: str) -> Part:
    return Part(path, uid, path.stat().st_size)


def junk(path: Path, size: int = 4096) -> Part:
    path.write_bytes(os.urandom(size))
    return Part(path, "9.9.9." + str(int.from_bytes(os.urandom(4), "big")), size)


@pytest.fixture
def client(clean_orthanc: LocalOrthanc) -> DicomWebClient:
    return DicomWebClient(pacs_for(clean_orthanc))


# -- STOW-RS ----------------------------------------------------------------------------------


def test_one_instance_delivered_and_stored(client: DicomWebClient, clean_orthanc: LocalOrthanc,
                                           tmp_path: Path) -> None:
    uid = write_instance(tmp_path / "a.dcm")
    resp = client.store([stow_part(tmp_path / "a.dcm", uid)])
    assert resp.http_status == 200
    [r] = resp.results
    assert r.outcome is Outcome.DELIVERED and r.sop_uid == uid
    assert clean_orthanc.list_instance_uids() == {uid}


def test_three_instances_one_request(client: DicomWebClient, clean_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    study, uids = write_study(tmp_path, 3)
    parts = [stow_part(p, u) for p, u in zip(sorted(tmp_path.glob("*.dcm")), uids)]
    resp = client.store(parts)
    assert [r.outcome for r in resp.results] == [Outcome.DELIVERED] * 3
    assert clean_orthanc.list_instance_uids() == set(uids)


def test_duplicate_resend_is_delivered(client: DicomWebClient, clean_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    uid = write_instance(tmp_path / "a.dcm", MR_SMALL)
    part = stow_part(tmp_path / "a.dcm", uid)
    client.store([part])
    resp = client.store([part])
    assert resp.http_status == 200 and resp.results[0].outcome is Outcome.DELIVERED
    assert clean_orthanc.count_instances() == 1


def test_good_plus_garbage(client: DicomWebClient, clean_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    uid = write_instance(tmp_path / "good.dcm")
    bad = junk(tmp_path / "bad.dcm")
    resp = client.store([stow_part(tmp_path / "good.dcm", uid), bad])
    # Orthanc: 400 for the request, yet the good part is listed and stored; the bad one in neither.
    assert resp.http_status == 400
    assert [r.outcome for r in resp.results] == [Outcome.DELIVERED, Outcome.SPLIT]
    assert clean_orthanc.list_instance_uids() == {uid}


def test_garbage_alone_is_permanent(client: DicomWebClient, clean_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    [r] = client.store([junk(tmp_path / "bad.dcm")]).results
    assert r.outcome is Outcome.PERMANENT and r.http_status == 400
    assert clean_orthanc.count_instances() == 0


def test_truncated_file_alone_is_permanent(client: DicomWebClient, tmp_path: Path) -> None:
    path = tmp_path / "trunc.dcm"
    shutil.copy(MR_TRUNCATED, path)
    [r] = client.store([Part(path, "1.2.3.4", path.stat().st_size)]).results
    assert r.outcome is Outcome.PERMANENT


def test_study_mismatch_failure_reason_is_decoded(client: DicomWebClient, clean_orthanc: LocalOrthanc,
                                                  tmp_path: Path) -> None:
    # POST /studies/{other} gives 409 with FailedSOPSequence reason 272 (0x0110): the decimal is decoded.
    uid = write_instance(tmp_path / "a.dcm")
    [r] = client.store([stow_part(tmp_path / "a.dcm", uid)], study_uid="1.2.3.999").results
    assert r.http_status == 409
    assert r.outcome is Outcome.LIMITED and r.reason_code == 0x0110 and "processing failure" in r.reason


def test_bigger_batch_streams_with_content_length(client: DicomWebClient, clean_orthanc: LocalOrthanc,
                                                  tmp_path: Path) -> None:
    _, uids = write_study(tmp_path, 40, MR_SMALL)
    parts = [stow_part(p, u) for p, u in zip(sorted(tmp_path.glob("*.dcm")), uids)]
    resp = client.store(parts)
    assert all(r.outcome is Outcome.DELIVERED for r in resp.results)
    assert clean_orthanc.count_instances() == 40


def test_wrong_password(clean_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    wrong = "Wr0ng-Pa55-" + os.urandom(4).hex()
    client = DicomWebClient(pacs_for(clean_orthanc, password=Secret(wrong)))
    _, uids = write_study(tmp_path, 10)
    parts = [stow_part(p, u) for p, u in zip(sorted(tmp_path.glob("*.dcm")), uids)]
    with pytest.raises(DestinationProblem) as info:
        client.store(parts)
    msg = str(info.value)
    assert info.value.status == 401
    assert "'orthanc'" in msg and clean_orthanc.dicomweb_url + "/studies" in msg
    assert "ORTHANC_USERNAME" in msg and "ORTHANC_PASSWORD" in msg
    assert wrong not in msg and wrong not in repr(info.value) and wrong not in repr(client.session.auth)
    with pytest.raises(DestinationProblem, match="ORTHANC_PASSWORD"):
        client.probe()
    assert clean_orthanc.count_instances() == 0


# -- QIDO, WADO, probe ------------------------------------------------------------------------


def test_qido_and_instance_exists(client: DicomWebClient, tmp_path: Path) -> None:
    study, uids = write_study(tmp_path, 2)
    client.store([stow_part(p, u) for p, u in zip(sorted(tmp_path.glob("*.dcm")), uids)])
    found = client.search(params={"StudyInstanceUID": study})
    assert [d["0020000D"]["Value"][0] for d in found] == [study]
    assert client.search(params={"StudyInstanceUID": "1.2.3.404"}) == []
    instances = client.search("instances", study_uid=study)
    assert {d["00080018"]["Value"][0] for d in instances} == set(uids)
    assert client.instance_exists(study, uids[0]) is True
    assert client.instance_exists(study, "1.2.3.404") is False
    assert client.instance_exists("1.2.3.405", uids[0]) is False


def test_retrieve_study_byte_identical(client: DicomWebClient, tmp_path: Path) -> None:
    src = tmp_path / "src"
    study, uids = write_study(src, 3, MR_SMALL)
    originals = {u: p.read_bytes() for p, u in zip(sorted(src.glob("*.dcm")), uids)}
    client.store([stow_part(p, u) for p, u in zip(sorted(src.glob("*.dcm")), uids)])
    progress: list[int] = []
    out = client.retrieve_study(study, tmp_path / "out", progress=progress.append)
    assert sorted(p.name for p in out) == sorted(f"{u}.dcm" for u in uids)
    for uid, data in originals.items():
        assert (tmp_path / "out" / f"{uid}.dcm").read_bytes() == data
    assert progress == [1, 2, 3]
    with pytest.raises(PacsError, match="not found") as info:
        client.retrieve_study("1.2.3.404", tmp_path / "none")
    assert info.value.status == 404 and not info.value.transient


def test_probe_ok_and_nothing_listening(client: DicomWebClient) -> None:
    client.probe()
    port = free_port()
    dead = DicomWebClient(PacsConfig(name="orthanc", type="orthanc", url=f"http://127.0.0.1:{port}",
                                     connect_timeout=1.0))
    with pytest.raises(PacsUnreachable) as info:
        dead.probe()
    msg = str(info.value)
    assert f"http://127.0.0.1:{port}/system" in msg and "connection refused" in msg and "ORTHANC_URL" in msg


def test_dcm4chee_layout_and_wrong_type(orthanc_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arc = orthanc_factory(username=None, dicomweb_root="/dcm4chee-arc/aets/DCM4CHEE/rs/")
    good = DicomWebClient(PacsConfig(name="dcm4chee", type="dcm4chee", url=arc.url))
    assert good.base == arc.dicomweb_url
    good.probe()
    uid = write_instance(tmp_path / "a.dcm")
    assert good.store([stow_part(tmp_path / "a.dcm", uid)]).results[0].outcome is Outcome.DELIVERED
    # The same server configured as type "orthanc": /system answers, /dicom-web does not exist.
    wrong = DicomWebClient(PacsConfig(name="arc", type="orthanc", url=arc.url))
    with pytest.raises(DestinationProblem) as info:
        wrong.probe()
    assert "plugin" in str(info.value) and "dicomweb_root" in str(info.value) and info.value.status == 404
    with pytest.raises(DestinationProblem):
        wrong.store([stow_part(tmp_path / "a.dcm", uid)])


# -- TLS (the real Orthanc behind a TLS terminator) -------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for IP 127.0.0.1 and a client certificate, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=relaypacsd test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'relaypacs-gw'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


class TlsTerminator:
    """HTTPS on 127.0.0.1:<port> in front of a plain-HTTP backend port, optionally requiring a client cert."""

    def __init__(self, backend_port: int, pki: Path, require_client_cert: bool = False):
        self.backend_port = backend_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
        if require_client_cert:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(pki / "ca.pem")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)  # accept() is not interrupted by close(): poll the stop flag instead
        self.port = self.sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.handshake_errors: list[str] = []
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._open.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_errors.append(str(exc))
            conn.close()
            return
        self._open.append(tls)  # wrapping detached `conn`: shut this one down at close()
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        self._open.append(backend)
        back = threading.Thread(target=self._pump, args=(backend, tls), daemon=True)
        back.start()
        self._pump(tls, backend)
        back.join(30)
        for s in (tls, backend):
            s.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for s in self._open:  # ends the pumps of connections a client kept alive
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)


@pytest.fixture
def https_orthanc(clean_orthanc: LocalOrthanc, pki: Path) -> Iterator[TlsTerminator]:
    term = TlsTerminator(clean_orthanc.http_port, pki)
    try:
        yield term
    finally:
        term.close()


def test_tls_verified_with_ca_bundle(clean_orthanc: LocalOrthanc, https_orthanc: TlsTerminator, pki: Path,
                                     tmp_path: Path) -> None:
    client = DicomWebClient(pacs_for(clean_orthanc, url=https_orthanc.url, ca_bundle=str(pki / "ca.pem")))
    client.probe()
    uid = write_instance(tmp_path / "a.dcm")
    assert client.store([stow_part(tmp_path / "a.dcm", uid)]).results[0].outcome is Outcome.DELIVERED
    assert uid in clean_orthanc.list_instance_uids()


def test_tls_without_the_ca_fails_clearly(clean_orthanc: LocalOrthanc, https_orthanc: TlsTerminator,
                                          tmp_path: Path) -> None:
    client = DicomWebClient(pacs_for(clean_orthanc, url=https_orthanc.url))
    uid = write_instance(tmp_path / "a.dcm")
    with pytest.raises(PacsUnreachable) as info:
        client.store([stow_part(tmp_path / "a.dcm", uid)])
    msg = str(info.value)
    assert "TLS certificate verification failed" in msg and "ca_bundle" in msg and https_orthanc.url in msg
    assert clean_orthanc.count_instances() == 0


def test_tls_client_certificate(clean_orthanc: LocalOrthanc, pki: Path) -> None:
    term = TlsTerminator(clean_orthanc.http_port, pki, require_client_cert=True)
    try:
        without = DicomWebClient(pacs_for(clean_orthanc, url=term.url, ca_bundle=str(pki / "ca.pem")))
        with pytest.raises(PacsUnreachable, match="client_cert"):
            without.probe()
        with_cert = DicomWebClient(pacs_for(clean_orthanc, url=term.url, ca_bundle=str(pki / "ca.pem"),
                                            client_cert=str(pki / "client.pem"), client_key=str(pki / "client.key")))
        with_cert.probe()
    finally:
        term.close()


def test_the_running_orthancs_config_is_owner_only(orthanc: LocalOrthanc) -> None:
    """The config Orthanc runs with holds its HTTP password in clear (item 15): 0600, not the umask's 0644."""
    assert orthanc.password in orthanc.config_path.read_text()
    assert orthanc.config_path.stat().st_mode & 0o777 == 0o600


@pytest.fixture(scope="module")
def store_only_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    """A real Orthanc where the account 'storeonly' may store but not query (its Lua filter answers 403)."""
    workdir = tmp_path_factory.mktemp("orthanc-store-only")
    lua = workdir / "store-only.lua"
    lua.write_text(STORE_ONLY_FILTER)
    server = LocalOrthanc(workdir, extra={"LuaScripts": [str(lua)], "RegisteredUsers": {"storeonly": "st0re-pw"}})
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - same policy as the conftest fixtures
        pytest.skip(f"real Orthanc unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop(timeout=0)


def test_a_store_only_account_is_reachable_and_gets_its_files(store_only_orthanc: LocalOrthanc,
                                                              tmp_path: Path) -> None:
    """Item 11: STOW 200 but QIDO 403 marked the PACS DOWN for ever; the probe must not demand query rights."""
    client = DicomWebClient(pacs_for(store_only_orthanc, username="storeonly", password=Secret("st0re-pw")))
    with pytest.raises(DestinationProblem, match="403"):
        client.search("studies")  # the filter really denies GET to this account
    client.probe()
    uid = write_instance(tmp_path / "a.dcm")
    assert client.store([stow_part(tmp_path / "a.dcm", uid)]).results[0].outcome is Outcome.DELIVERED
    assert uid in store_only_orthanc.list_instance_uids()
    with pytest.raises(DestinationProblem, match="401"):  # a wrong password is still down
        DicomWebClient(pacs_for(store_only_orthanc, username="storeonly", password=Secret("wrong"))).probe()


def test_stows_around_orthancs_keepalive_timeout_are_delivered(client: DicomWebClient, clean_orthanc: LocalOrthanc,
                                                                tmp_path: Path) -> None:
    """Item 17 against the real server: Orthanc closes idle keep-alive connections after 1 s, so a STOW sent
    about then may go out on a connection it is closing. Each is delivered (the deterministic case, a close
    with no byte of answer, is in tests/test_dicomweb.py; here about 1 in 30 sends failed before)."""
    sops = []
    for i, wait in enumerate([1.5, 1.0, 0.99, 1.01, 0]):
        uid = write_instance(tmp_path / f"{i}.dcm")
        resp = client.store([stow_part(tmp_path / f"{i}.dcm", uid)])
        assert resp.results[0].outcome is Outcome.DELIVERED
        sops.append(uid)
        time.sleep(wait)
    assert set(sops) <= clean_orthanc.list_instance_uids()
