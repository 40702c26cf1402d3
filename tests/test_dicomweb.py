"""relaypacsd.dicomweb against a local HTTP server with canned answers (the real Orthanc is in
tests/integration): exact STOW framing, streaming, error mapping, QIDO and streamed WADO parsing."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from relaypacsd.config import PacsConfig, Secret
from relaypacsd.dicomweb import CHUNK_SIZE, DicomWebClient, StowBody, _MultipartWriter
from relaypacsd.errors import PartChanged
from relaypacsd.errors import DestinationProblem, PacsError, PacsUnreachable
from relaypacsd.http import make_session
from relaypacsd.models import Part
from relaypacsd.outcomes import Outcome
from relaypacsd.senders import stow_unusable
from tests.dicomfactory import write_instance, write_study
from tests.canned_http import PASSWORD, Answer, CannedServer, OAuthServer, Received

UID_A, UID_B = "1.2.826.0.1.1", "1.2.826.0.1.2"


def cfg(url: str, **kwargs: Any) -> PacsConfig:
    kwargs.setdefault("username", "relay")
    kwargs.setdefault("password", Secret(PASSWORD))
    return PacsConfig(name=kwargs.pop("name", "main-pacs"), type=kwargs.pop("type", "dicomweb"), url=url, **kwargs)


def part(tmp_path: Path, name: str, data: bytes, uid: str) -> Part:
    p = tmp_path / name
    p.write_bytes(data)
    return Part(p, uid, len(data))


def referenced(*uids: str) -> dict:
    return {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}}


def failed(uid: str, reason: int) -> dict:
    return {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]},
                                                "00081197": {"vr": "US", "Value": [reason]}}]}}


@pytest.fixture
def two_parts(tmp_path: Path) -> list[Part]:
    return [part(tmp_path, "a.dcm", b"DICM-A" * 100, UID_A), part(tmp_path, "b.dcm", os.urandom(5000), UID_B)]


# -- STOW-RS framing --------------------------------------------------------------------------


def test_store_exact_multipart_framing(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(200, referenced(UID_A, UID_B))
    resp = DicomWebClient(cfg(canned.url)).store(two_parts)
    assert [r.outcome for r in resp.results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert resp.http_status == 200 and resp.elapsed_ms > 0

    [rec] = canned.received
    assert rec.method == "POST" and rec.path == "/studies"
    ctype = rec.headers["Content-Type"]
    m = re.fullmatch(r'multipart/related; type="application/dicom"; boundary=([A-Za-z0-9-]+)', ctype)
    assert m, ctype  # unquoted boundary: Orthanc only strips quotes since a hotfix (bug #190)
    b = m.group(1).encode()
    expected = b"".join(
        b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + p.path.read_bytes() + b"\r\n" for p in two_parts
    ) + b"--" + b + b"--\r\n"
    assert rec.body == expected
    assert rec.headers["Accept"] == "application/dicom+json"
    assert int(rec.headers["Content-Length"]) == len(expected)
    assert "Transfer-Encoding" not in rec.headers and not rec.chunked


def test_store_url_uses_stow_base(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(200, referenced(UID_A))
    DicomWebClient(cfg(canned.url, type="orthanc")).store(two_parts[:1])
    DicomWebClient(cfg(canned.url, type="dcm4chee", ae_title="ARCH")).store(two_parts[:1])
    assert [r.path for r in canned.received] == ["/dicom-web/studies", "/dcm4chee-arc/aets/ARCH/rs/studies"]


def test_body_streamed_in_chunks_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = part(tmp_path, "big.dcm", os.urandom(5 * 1024 * 1024 + 17), UID_A)
    reads: list[int] = []
    real_readv = os.readv

    def spy(fd: int, buffers: list[memoryview]) -> int:
        reads.append(sum(len(b) for b in buffers))
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", spy)
    body = StowBody([big], "B")
    chunks = iter(body)
    first = [bytes(next(chunks)) for _ in range(3)]  # a chunk holds until the next is asked for
    assert first[0].startswith(b"--B\r\n") and len(first[0]) == len(first[1]) == CHUNK_SIZE
    assert len(reads) == 3  # lazily: only what was consumed has been read
    rest = [bytes(c) for c in chunks]
    assert all(0 < n <= CHUNK_SIZE for n in reads)
    assert max(len(c) for c in first + rest) <= CHUNK_SIZE
    assert sum(len(c) for c in first + rest) == len(body)


@pytest.mark.parametrize("chunk_size", [7, 64, 100, 4096, CHUNK_SIZE])
def test_body_is_the_same_multipart_whatever_the_chunk_size(tmp_path: Path, chunk_size: int) -> None:
    """Header, file and CRLF of each part land across chunk edges at every offset: the bytes are the same."""
    parts = [part(tmp_path, f"{i}.dcm", os.urandom(n), UID_A) for i, n in enumerate((1, 63, 64, 65, 300, 0))]
    expected = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + p.path.read_bytes() + b"\r\n"
                        for p in parts) + b"--B--\r\n"
    chunks = [bytes(c) for c in StowBody(parts, "B", chunk_size)]
    assert b"".join(chunks) == expected and len(StowBody(parts, "B")) == len(expected)
    assert all(len(c) == chunk_size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_size


def test_big_file_sent_with_content_length(canned: CannedServer, tmp_path: Path) -> None:
    big = part(tmp_path, "big.dcm", os.urandom(3 * 1024 * 1024), UID_A)
    canned.responder = lambda rec: Answer(200, referenced(UID_A))
    resp = DicomWebClient(cfg(canned.url)).store([big])
    assert resp.results[0].outcome is Outcome.DELIVERED
    rec = canned.received[0]
    assert not rec.chunked and int(rec.headers["Content-Length"]) == len(rec.body) > 3 * 1024 * 1024


def test_file_size_changed_raises(canned: CannedServer, tmp_path: Path) -> None:
    p = part(tmp_path, "growing.dcm", b"x" * 100, UID_A)
    p.path.write_bytes(b"x" * 150)
    with pytest.raises(PartChanged, match="growing.dcm"):
        DicomWebClient(cfg(canned.url)).store([p])
    assert canned.received == []
    # Also when it changes while the request is already streaming.
    body = StowBody([Part(p.path, UID_A, 100)], "B")
    with pytest.raises(PartChanged):
        list(body)


def test_timeouts_always_passed(canned: CannedServer, two_parts: list[Part], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real = requests.Session.request

    def spy(self: requests.Session, method: str, url: str, **kwargs: Any) -> requests.Response:
        seen.append(kwargs.get("timeout"))
        return real(self, method, url, **kwargs)

    monkeypatch.setattr(requests.Session, "request", spy)
    canned.responder = lambda rec: Answer(200, [] if rec.method == "GET" else referenced(UID_A))
    client = DicomWebClient(cfg(canned.url, connect_timeout=3.5, read_timeout=42.0))
    client.store(two_parts[:1])
    client.search()
    client.probe()
    assert seen and all(t == (3.5, 42.0) for t in seen)


# -- STOW-RS answers --------------------------------------------------------------------------


def test_503_is_transient(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(503, b"Busy", headers={"Retry-After": "10"})
    resp = DicomWebClient(cfg(canned.url)).store(two_parts)
    assert resp.http_status == 503 and resp.body is None
    assert [r.outcome for r in resp.results] == [Outcome.TRANSIENT] * 2


def test_413_splits_a_batch_and_keeps_a_single_waiting(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(413, b"<html>Request Entity Too Large</html>")
    client = DicomWebClient(cfg(canned.url))
    assert [r.outcome for r in client.store(two_parts).results] == [Outcome.SPLIT] * 2
    assert [r.outcome for r in client.store(two_parts[:1]).results] == [Outcome.TRANSIENT]


def test_202_with_failed_sop_sequence(canned: CannedServer, two_parts: list[Part]) -> None:
    body = {**referenced(UID_A), **failed(UID_B, 0xC122)}
    canned.responder = lambda rec: Answer(202, body)
    resp = DicomWebClient(cfg(canned.url)).store(two_parts)
    a, b = resp.results
    assert a.outcome is Outcome.DELIVERED
    assert b.outcome is Outcome.PERMANENT and b.reason_code == 0xC122 and "transfer syntax" in b.reason
    assert resp.body == body


def test_202_without_body_and_200_with_junk(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(202, b"")
    client = DicomWebClient(cfg(canned.url))
    assert [r.outcome for r in client.store(two_parts[:1]).results] == [Outcome.LIMITED]
    # A success we cannot read says nothing about any file: the PACS (or a proxy) is at fault, not them.
    canned.responder = lambda rec: Answer(200, b"{not json")
    with pytest.raises(DestinationProblem, match="not DICOM JSON"):
        client.store(two_parts)


def test_json_without_content_type_is_parsed(canned: CannedServer, two_parts: list[Part]) -> None:
    import json

    canned.responder = lambda rec: Answer(400, json.dumps(referenced(UID_A)).encode())
    resp = DicomWebClient(cfg(canned.url)).store(two_parts)
    assert [r.outcome for r in resp.results] == [Outcome.DELIVERED, Outcome.SPLIT]


def test_slow_read_is_unreachable(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(200, referenced(UID_A), delay=1.0)
    with pytest.raises(PacsUnreachable) as info:
        DicomWebClient(cfg(canned.url, read_timeout=0.3)).store(two_parts[:1])
    msg = str(info.value)
    assert "main-pacs" in msg and canned.url + "/studies" in msg and "read_timeout" in msg
    assert info.value.transient and info.value.sent  # it took the request: it may have stored the files


def test_401_names_pacs_url_and_variables_not_password(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(401, headers={"WWW-Authenticate": 'Basic realm="Orthanc Secure Area"'})
    with pytest.raises(DestinationProblem) as info:
        DicomWebClient(cfg(canned.url)).store(two_parts)
    msg = str(info.value)
    assert "main-pacs" in msg and canned.url + "/studies" in msg
    assert "MAIN_PACS_USERNAME" in msg and "MAIN_PACS_PASSWORD" in msg and "password_file" in msg
    assert PASSWORD not in msg and PASSWORD not in repr(info.value)
    assert info.value.status == 401


def test_403_mentions_permissions(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(403)
    with pytest.raises(DestinationProblem, match="permission") as info:
        DicomWebClient(cfg(canned.url)).store(two_parts)
    assert info.value.status == 403


@pytest.mark.parametrize("status", [404, 405, 415])
def test_endpoint_missing_is_destination_problem(canned: CannedServer, two_parts: list[Part], status: int) -> None:
    canned.responder = lambda rec: Answer(status)
    with pytest.raises(DestinationProblem) as info:
        DicomWebClient(cfg(canned.url, type="orthanc")).store(two_parts)
    msg = str(info.value)
    assert "DICOMweb" in msg and "plugin" in msg and "dicomweb_root" in msg and canned.url + "/dicom-web" in msg


def test_connection_refused_is_unreachable(two_parts: list[Part]) -> None:
    with pytest.raises(PacsUnreachable) as info:
        DicomWebClient(cfg("http://127.0.0.1:1", name="orthanc", type="orthanc",
                           connect_timeout=1)).store(two_parts)
    msg = str(info.value)
    assert "'orthanc'" in msg and "http://127.0.0.1:1/dicom-web/studies" in msg
    assert "connection refused" in msg and "is Orthanc running" in msg and "ORTHANC_URL" in msg
    assert PASSWORD not in msg
    assert info.value.sent is False  # nothing reached a PACS: another way (C-STORE) may be tried


@pytest.fixture
def cut_answer() -> Iterator[str]:
    """A server that reads a whole request, starts a 200 answer and closes mid-body (a proxy cutting it)."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 500\r\n\r\n{\"00081199\"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()
        thread.join(5)


def test_an_answer_cut_off_after_the_upload_counts_as_sent(cut_answer: str, two_parts: list[Part]) -> None:
    """The PACS may have stored the files: retry them over STOW later, never resend them another way now."""
    with pytest.raises(PacsUnreachable) as info:
        DicomWebClient(cfg(cut_answer)).store(two_parts)
    assert info.value.sent is True and "connection broke during the request" in str(info.value)
    assert not stow_unusable(info.value)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_destination_problem_never_a_get(canned: CannedServer, two_parts: list[Part],
                                                         status: int) -> None:
    """requests turns a redirected POST into a GET; its empty query answer would blame the files."""
    canned.responder = lambda rec: Answer(status, headers={"Location": "https://pacs.example/dicom-web/studies"})
    with pytest.raises(DestinationProblem) as info:
        DicomWebClient(cfg(canned.url)).store(two_parts)
    assert "redirect" in str(info.value) and "https://pacs.example/dicom-web/studies" in str(info.value)
    assert [r.method for r in canned.received] == ["POST"]


def test_a_2xx_answer_that_is_not_dicom_json_is_a_destination_problem(canned: CannedServer,
                                                                      two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(200, b"<NativeDicomModel/>", headers={"Content-Type": "application/dicom+xml"})
    with pytest.raises(DestinationProblem, match="not DICOM JSON.*application/dicom\\+xml"):
        DicomWebClient(cfg(canned.url)).store(two_parts)


def test_oauth2_expired_token_during_stow_resends_whole_body(canned: CannedServer, two_parts: list[Part]) -> None:
    oauth = OAuthServer(canned)
    base_respond = oauth.respond

    def respond(rec: Received) -> Answer:
        answer = base_respond(rec)
        return Answer(200, referenced(UID_A, UID_B)) if rec.path == "/studies" and answer.status == 200 else answer

    canned.responder = respond
    pacs = PacsConfig(name="cloud", url=canned.url, oauth2_token_url=canned.url + "/token",
                      client_id="gw", client_secret=Secret("cs"))
    client = DicomWebClient(pacs)
    client.store(two_parts)
    oauth.valid.clear()  # token revoked/expired early on the server side
    resp = client.store(two_parts)
    assert [r.outcome for r in resp.results] == [Outcome.DELIVERED] * 2
    stows = [r for r in canned.received if r.path == "/studies"]
    assert len(stows) == 3 and len(oauth.token_requests) == 2
    assert stows[1].headers["Authorization"] == "Bearer tok-1" and stows[2].headers["Authorization"] == "Bearer tok-2"
    assert stows[2].body == stows[0].body.replace(*_boundaries(stows[0], stows[2]))
    assert int(stows[2].headers["Content-Length"]) == len(stows[2].body)


def _boundaries(a: Received, b: Received) -> tuple[bytes, bytes]:
    get = lambda r: r.headers["Content-Type"].rsplit("boundary=", 1)[1].encode()  # noqa: E731
    return get(a), get(b)


# -- probe ------------------------------------------------------------------------------------


def test_probe_orthanc_checks_system_and_dicomweb(canned: CannedServer) -> None:
    canned.responder = lambda rec: Answer(200, {"Version": "1.10.1"} if rec.path == "/system" else [])
    DicomWebClient(cfg(canned.url, type="orthanc")).probe()
    assert [r.path for r in canned.received] == ["/system", "/dicom-web/studies?limit=1"]


def test_probe_generic_dicomweb_uses_qido(canned: CannedServer) -> None:
    canned.responder = lambda rec: Answer(204)
    DicomWebClient(cfg(canned.url + "/rs", type="dicomweb")).probe()
    assert [r.path for r in canned.received] == ["/rs/studies?limit=1"]
    assert canned.received[0].headers["Accept"] == "application/dicom+json"


def test_probe_errors(canned: CannedServer) -> None:
    client = DicomWebClient(cfg(canned.url, type="orthanc"))
    canned.responder = lambda rec: Answer(401)
    with pytest.raises(DestinationProblem, match="MAIN_PACS_PASSWORD"):
        client.probe()
    canned.responder = lambda rec: Answer(200) if rec.path == "/system" else Answer(404)
    with pytest.raises(DestinationProblem, match="plugin"):
        client.probe()
    canned.responder = lambda rec: Answer(503)
    with pytest.raises(PacsError) as info:
        client.probe()
    assert info.value.transient and info.value.status == 503 and not isinstance(info.value, DestinationProblem)


def test_probe_nothing_listening() -> None:
    with pytest.raises(PacsUnreachable, match="http://127.0.0.1:1/system"):
        DicomWebClient(cfg("http://127.0.0.1:1", type="orthanc", connect_timeout=1)).probe()


# -- QIDO-RS ----------------------------------------------------------------------------------


def test_search_paths_params_and_empty_answers(canned: CannedServer) -> None:
    canned.responder = lambda rec: Answer(200, [{"0020000D": {"vr": "UI", "Value": ["1.2"]}}])
    c = DicomWebClient(cfg(canned.url + "/rs"))
    assert c.search(params={"PatientID": "X1", "limit": 5}) == [{"0020000D": {"vr": "UI", "Value": ["1.2"]}}]
    c.search("series", study_uid="1.2")
    c.search("instances", study_uid="1.2", series_uid="1.3")
    c.search("instances", study_uid="1.2")
    c.search("studies", study_uid="1.2")
    assert [r.path for r in canned.received] == [
        "/rs/studies?PatientID=X1&limit=5", "/rs/studies/1.2/series", "/rs/studies/1.2/series/1.3/instances",
        "/rs/studies/1.2/instances", "/rs/studies/1.2"]
    canned.responder = lambda rec: Answer(204)
    assert c.search() == []
    canned.responder = lambda rec: Answer(200, b"")
    assert c.search() == []
    with pytest.raises(ValueError):
        c.search("patients")


def test_instance_exists(canned: CannedServer) -> None:
    def respond(rec: Received) -> Answer:
        if "SOPInstanceUID=1.9.1" in rec.path:
            return Answer(200, [{"00080018": {"vr": "UI", "Value": ["1.9.1"]}}])
        return Answer(200, [])

    canned.responder = respond
    c = DicomWebClient(cfg(canned.url))
    assert c.instance_exists("1.9", "1.9.1") is True
    assert c.instance_exists("1.9", "1.9.2") is False
    assert canned.received[0].path == "/studies/1.9/instances?SOPInstanceUID=1.9.1"


# -- WADO-RS ----------------------------------------------------------------------------------


def multipart(files: list[bytes], boundary: str = "wado-b") -> bytes:
    out = b"preamble to ignore\r\n"
    for data in files:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


@pytest.fixture
def study_files(tmp_path: Path) -> tuple[str, list[str], list[bytes]]:
    study, sops = write_study(tmp_path / "src", 3)
    files = [p.read_bytes() for p in sorted((tmp_path / "src").iterdir())]
    return study, sops, files


def test_retrieve_study_writes_one_file_per_instance(canned: CannedServer, tmp_path: Path,
                                                     study_files: tuple[str, list[str], list[bytes]]) -> None:
    study, sops, files = study_files
    canned.responder = lambda rec: Answer(
        200, multipart(files), headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=wado-b'})
    seen: list[int] = []
    out = DicomWebClient(cfg(canned.url)).retrieve_study(study, tmp_path / "out", progress=seen.append)
    assert sorted(p.name for p in out) == sorted(f"{s}.dcm" for s in sops)
    for sop, data in zip(sops, files):
        assert (tmp_path / "out" / f"{sop}.dcm").read_bytes() == data
    assert seen == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(p.name for p in out)  # no temp files left
    rec = canned.received[0]
    assert rec.path == f"/studies/{study}" and rec.headers["Accept"] == 'multipart/related; type="application/dicom"'


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_multipart_parser_any_chunking(tmp_path: Path, chunk: int,
                                       study_files: tuple[str, list[str], list[bytes]]) -> None:
    _, sops, files = study_files
    files = files + [b"not dicom\r\n--wado-almost\r\n"]  # a part that is no DICOM, and a near-delimiter
    raw = multipart(files)
    chunks: Iterator[bytes] = (raw[i:i + chunk] for i in range(0, len(raw), chunk))
    out = _MultipartWriter("wado-b", tmp_path, None).run(chunks)
    assert [p.read_bytes() for p in out] == files
    assert [p.name for p in out[:3]] == [f"{s}.dcm" for s in sops] and out[3].name == "part-000003.dcm"


def test_multipart_cut_short_raises_and_leaves_no_temp(tmp_path: Path,
                                                      study_files: tuple[str, list[str], list[bytes]]) -> None:
    raw = multipart(study_files[2])
    with pytest.raises(PacsError, match="ended before"):
        _MultipartWriter("wado-b", tmp_path, None).run(iter([raw[: len(raw) // 2]]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".wado-")]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_uid_cannot_escape_out_dir(tmp_path: Path) -> None:
    import pydicom

    src = tmp_path / "x.dcm"
    write_instance(src)
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = "../../evil"
    ds.save_as(src)
    out = _MultipartWriter("wado-b", tmp_path / "out", None)
    (tmp_path / "out").mkdir()
    [written] = out.run(iter([multipart([src.read_bytes()])]))
    assert written.parent == tmp_path / "out" and written.name == "part-000000.dcm"


def test_retrieve_study_404(canned: CannedServer, tmp_path: Path) -> None:
    canned.responder = lambda rec: Answer(404)
    with pytest.raises(PacsError, match="study 1.2.3 not found") as info:
        DicomWebClient(cfg(canned.url)).retrieve_study("1.2.3", tmp_path)
    assert info.value.transient is False and info.value.status == 404


def test_session_is_injectable(canned: CannedServer, two_parts: list[Part]) -> None:
    canned.responder = lambda rec: Answer(200, referenced(UID_A))
    session = make_session(cfg(canned.url))
    client = DicomWebClient(cfg(canned.url), session=session)
    assert client.session is session and client.base == canned.url
    client.store(two_parts[:1])


def test_a_probe_on_a_connection_closed_under_it_is_sent_once_more() -> None:
    """A PACS drops idle keep-alive connections; a probe reusing one as it closes must not report a healthy
    PACS down (it failed a CI run: the PACS that stayed up was logged DOWN, then 'reachable again')."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        for answer in (False, True):  # the first request gets no answer at all
            conn, _ = srv.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                seen.append(data.split(b" ", 2)[0])
                if answer:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n[]")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        DicomWebClient(cfg(f"http://127.0.0.1:{srv.getsockname()[1]}")).probe()
    finally:
        srv.close()
        thread.join(5)
    assert seen == [b"GET", b"GET"]


@pytest.mark.parametrize("status", [403, 405])
def test_probe_of_a_store_only_endpoint_is_reachable(canned: CannedServer, status: int) -> None:
    """A GET refused with 403/405 came from a server that answered at the STOW URL: reachable (item 11);
    a 401 still is not (our credentials fail a STOW too)."""
    canned.responder = lambda rec: Answer(status)
    DicomWebClient(cfg(canned.url, type="orthanc")).probe()
    DicomWebClient(cfg(canned.url + "/rs", type="dicomweb")).probe()
    canned.responder = lambda rec: Answer(401)
    with pytest.raises(DestinationProblem, match="refused our credentials"):
        DicomWebClient(cfg(canned.url + "/rs", type="dicomweb")).probe()


def _read_request(conn: socket.socket, data: bytes = b"") -> tuple[bytes, bytes]:
    """One whole HTTP request (head, body) from `conn`, and nothing of the next."""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


def _stow_ok(uids: list[str]) -> bytes:
    import json as _json

    doc = _json.dumps(referenced(*uids)).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: "
            + str(len(doc)).encode() + b"\r\n\r\n" + doc)


@pytest.mark.parametrize("how", ["reads-then-closes", "resets-at-once"])
def test_a_stow_on_a_keepalive_connection_the_pacs_just_closed_is_sent_once_more(tmp_path: Path, how: str) -> None:
    """Item 17: the PACS closes an idle keep-alive connection just as the next STOW goes out on it (no byte of
    answer): resent once on a fresh connection, delivered, not 'unreachable' (which marked the PACS down)."""
    uids = ["1.2.3.1", "1.2.3.2"]
    first, second = part(tmp_path, "a.dcm", b"A" * 3000, uids[0]), part(tmp_path, "b.dcm", b"B" * 3000, uids[1])
    srv = socket.create_server(("127.0.0.1", 0))
    posts: list[int] = []  # connection number of each whole POST received

    def serve() -> None:
        srv.settimeout(10)  # never outlive the test, even when the client gave up early
        conn, _ = srv.accept()
        with conn:
            _read_request(conn)
            posts.append(1)
            conn.sendall(_stow_ok(uids[:1]))  # keep-alive: the client pools this connection
            if how == "reads-then-closes":
                _read_request(conn)
                posts.append(1)
            else:  # closed with the request unread: the kernel answers RST
                conn.recv(1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn, _ = srv.accept()
        with conn:
            _read_request(conn)
            posts.append(2)
            conn.sendall(_stow_ok(uids[1:]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = DicomWebClient(cfg(f"http://127.0.0.1:{srv.getsockname()[1]}", type="dicomweb", read_timeout=5))
        assert client.store([first]).results[0].outcome is Outcome.DELIVERED
        assert client.store([second]).results[0].outcome is Outcome.DELIVERED
    finally:
        srv.close()
        thread.join(5)
    assert posts[-1] == 2 and posts.count(2) == 1  # one resend, on a fresh connection


def test_a_stow_that_timed_out_is_never_sent_twice(tmp_path: Path) -> None:
    """A slow PACS may still be storing the batch: a read timeout is not a closed connection."""
    srv = socket.create_server(("127.0.0.1", 0))
    posts: list[int] = []
    done = threading.Event()

    def serve() -> None:
        srv.settimeout(5)
        try:
            while not done.is_set():
                conn, _ = srv.accept()
                with conn:
                    _read_request(conn)
                    posts.append(1)
                    done.wait(3)  # never answers in time
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = DicomWebClient(cfg(f"http://127.0.0.1:{srv.getsockname()[1]}", type="dicomweb", read_timeout=0.5))
        with pytest.raises(PacsUnreachable, match="read_timeout"):
            client.store([part(tmp_path, "a.dcm", b"A" * 100, "1.2.3.1")])
    finally:
        done.set()
        srv.close()
        thread.join(5)
    assert posts == [1]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_stow_answer_is_the_pacss_fault_and_never_read_whole(tmp_path: Path, framing: str) -> None:
    """Item 18: the STOW answer was read whole, without a cap. Past the cap (1 MiB + 4 KiB per instance) it is
    a transient PacsError: the files wait (never failed, never delivered), and the rest is never read."""
    from relaypacsd.delivery import deliver_parts
    from relaypacsd.senders import DicomWebSender

    srv = socket.create_server(("127.0.0.1", 0))
    sent = [0]
    total = 64 * 1024 * 1024  # what the server would send if the client read it all

    def serve() -> None:
        srv.settimeout(10)
        for _ in range(2):  # store() and deliver_parts(): one connection each (the first is closed by the client)
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    _read_request(conn)
                    piece = b"[" + b" " * (256 * 1024 - 2) + b"]"
                    if framing == "content-length":
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: "
                                     + str(total).encode() + b"\r\n\r\n")
                    else:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n")
                    while sent[0] < total:
                        data = piece if framing == "content-length" else b"%x\r\n%s\r\n" % (len(piece), piece)
                        conn.sendall(data)
                        sent[0] += len(piece)
                except OSError:
                    pass  # the client stopped reading and closed

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = DicomWebClient(cfg(f"http://127.0.0.1:{srv.getsockname()[1]}", type="dicomweb", read_timeout=5))
        one = part(tmp_path, "a.dcm", b"A" * 100, "1.2.3.1")
        with pytest.raises(PacsError, match="more than 1028 KiB") as info:
            client.store([one])
        assert info.value.transient and not isinstance(info.value, (DestinationProblem, PacsUnreachable))
        results = deliver_parts(DicomWebSender(client.pacs), [one], attempts=1, delay=0)
        assert results[one].outcome is Outcome.TRANSIENT
    finally:
        srv.close()
        thread.join(10)
    assert sent[0] < total / 2  # the client stopped reading: the answer was never held whole
