"""DICOMweb client for one PACS: STOW-RS (streamed from disk), QIDO-RS, WADO-RS and a health probe.

Errors are turned into relaypacsd exceptions whose messages name the PACS, the URL and what to
check; STOW-RS answers are reconciled per instance by relaypacsd.outcomes, never by status alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
import requests
import urllib3

from relaypacsd import dicomjson
from relaypacsd.config import PacsConfig
from relaypacsd.uids import is_uid
from relaypacsd.errors import DestinationProblem, PacsError, PacsUnreachable, PartChanged
from relaypacsd.http import env_prefix, log_security_warnings, make_session
from relaypacsd.models import Part
from relaypacsd.outcomes import InstanceResult, reconcile

CHUNK_SIZE = 256 * 1024
DICOM_JSON = "application/dicom+json"
_MAX_PART_HEADERS = 64 * 1024
# The cap on a STOW answer held in memory. Orthanc answers about 470 bytes of DICOM JSON per instance
# (class and instance UIDs, a RetrieveURL: 23 KB for a batch of 50, measured); 4 KiB per instance plus 1 MiB
# for warnings and failure reasons is ~50 times that (1.2 MiB for 50, 41 MiB for the largest batch allowed,
# 10000). Anything larger is not a STOW answer: a PACS or proxy fault, never held whole in memory.
STOW_ANSWER_BASE = 1024 * 1024
STOW_ANSWER_PER_INSTANCE = 4096
# Answers to the probe's GET from a server that may let us store though not query (see DicomWebClient.probe).
_STORE_ONLY = (403, 405)


@dataclass
class StowResponse:
    """The PACS's answer to one STOW-RS request, reconciled per instance."""

    http_status: int
    body: dict | None
    elapsed_ms: float
    results: list[InstanceResult]


class StowBody:
    """A multipart/related body read from disk chunk by chunk; re-iterable (a 401 re-send restarts it)
    and sized, so requests sends Content-Length instead of chunked transfer encoding. Each chunk is a view of
    one buffer, valid until the next is asked for: copy it (bytes(chunk)) to keep it."""

    def __init__(self, parts: list[Part], boundary: str, chunk_size: int = CHUNK_SIZE):
        self.parts = parts
        self.boundary = boundary
        self.chunk_size = chunk_size
        self._head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        self._tail = f"--{boundary}--\r\n".encode("ascii")

    def __len__(self) -> int:
        return sum(len(self._head) + p.size + 2 for p in self.parts) + len(self._tail)

    def __iter__(self) -> Iterator[memoryview]:
        # Each yield is one send() and, with TCP_NODELAY, at least one segment: three per file (header,
        # data, CRLF) made the PACS read in small pieces, so the body goes out in full chunks. The files are
        # read straight into one chunk buffer that is handed out again and again: http.client sends each
        # chunk whole (sendall) before it asks for the next. A fresh 256 KiB string per chunk (a join) cost
        # more than the copy it saved, its pages faulted in each time (18 -> 11 us per 39 KB file).
        size = self.chunk_size
        buf = bytearray(size)
        view = memoryview(buf)
        n = 0  # bytes of buf filled
        for piece in self._pieces():
            if isinstance(piece, bytes):  # a part's header, its CRLF, the closing boundary
                done = 0
                while done < len(piece):
                    if n == size:
                        yield view
                        n = 0
                    k = min(size - n, len(piece) - done)
                    buf[n:n + k] = piece[done:done + k]
                    n, done = n + k, done + k
                continue
            fd, sent = _open_part(piece), 0
            try:
                while sent < piece.size:
                    if n == size:
                        yield view
                        n = 0
                    got = os.readv(fd, [view[n:min(size, n + piece.size - sent)]])
                    if not got:
                        raise PartChanged(piece.path, piece.size, sent)
                    n += got
                    sent += got
            finally:
                os.close(fd)
        if n:
            yield view[:n]

    def _pieces(self) -> Iterator[bytes | Part]:
        for part in self.parts:
            yield self._head
            yield part
            yield b"\r\n"
        yield self._tail


def _open_part(part: Part) -> int:
    """An open descriptor of the part's file, when it still has the size it had when the batch was made."""
    try:
        fd = os.open(part.path, os.O_RDONLY)
    except FileNotFoundError:
        # Deleted after the check before the request: the file's problem. As an OSError it would reach
        # urllib3, which reports it as a broken connection, and the PACS would be marked down.
        raise PartChanged(part.path, part.size, 0) from None
    actual = os.fstat(fd).st_size
    if actual != part.size:
        os.close(fd)
        raise PartChanged(part.path, part.size, actual)
    return fd


class DicomWebClient:
    """DICOMweb (STOW-RS, QIDO-RS, WADO-RS) for one PACS; one client per thread, like its session."""

    def __init__(self, pacs: PacsConfig, session: requests.Session | None = None, pool_size: int = 4):
        self.pacs = pacs
        if session is None:
            log_security_warnings(pacs)  # a client with a session of its own is its owner
            session = make_session(pacs, pool_size)
        self.session = session
        self.base = pacs.stow_base
        self.timeout = (pacs.connect_timeout, pacs.read_timeout)

    # -- STOW-RS ---------------------------------------------------------------------------------

    def store(self, parts: list[Part], study_uid: str | None = None) -> StowResponse:
        """POST the parts to {base}/studies (or /studies/{study_uid}, then all must belong to it) in one
        request and reconcile the answer per instance."""
        if not parts:
            raise ValueError("store() needs at least one part")
        for part in parts:
            # Fail before the request when a file is obviously still growing.
            actual = part.path.stat().st_size
            if actual != part.size:
                raise PartChanged(part.path, part.size, actual)
        # Unquoted token: Orthanc only strips a quoted boundary since a hotfix of its bug #190.
        boundary = "relaypacs-" + secrets.token_hex(16)
        body = StowBody(parts, boundary)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON,
            "Content-Length": str(len(body)),
        }
        url = f"{self.base}/studies" + (f"/{quote(study_uid, safe='')}" if study_uid else "")
        start = time.monotonic()
        # No redirects: requests would turn the POST into a GET (a query whose empty answer confirms nothing),
        # and the files would be blamed for a URL that needs fixing.
        resp = self._request("POST", url, data=body, headers=headers, allow_redirects=False, stream=True)
        content = self._read_answer(resp, url, STOW_ANSWER_BASE + STOW_ANSWER_PER_INSTANCE * len(parts))
        elapsed = (time.monotonic() - start) * 1000.0
        name = self.pacs.name
        if resp.is_redirect:
            where = resp.headers.get("Location", "?")
            raise DestinationProblem(f"PACS '{name}' answered STOW-RS at {url} with a redirect (HTTP "
                                     f"{resp.status_code}) to {where}: set [pacs.{name}] url to the address it "
                                     "redirects to", status=resp.status_code)
        self._raise_for_destination(resp, url)
        parsed = _json_or_none(content)
        doc = parsed if isinstance(parsed, dict) else None
        if 200 <= resp.status_code <= 299 and content.strip() and doc is None:
            kind = resp.headers.get("Content-Type") or "no Content-Type"
            raise DestinationProblem(f"PACS '{name}' answered STOW-RS at {url} (HTTP {resp.status_code}) with a body "
                                     f"that is not DICOM JSON ({kind}), though we ask for {DICOM_JSON}: enable "
                                     "JSON answers in its DICOMweb settings", status=resp.status_code)
        results = reconcile(resp.status_code, doc, [p.sop_uid for p in parts])
        return StowResponse(resp.status_code, doc, elapsed, results)

    def _read_answer(self, resp: requests.Response, url: str, limit: int) -> bytes:
        """The answer's body, read as it streams in and never beyond `limit` bytes: a larger one raises a
        transient PacsError (the files wait and go again; a PACS or proxy fault, not theirs)."""
        try:
            declared = int(resp.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0
        got = bytearray()
        try:
            if declared <= limit:
                for chunk in resp.iter_content(CHUNK_SIZE):
                    got += chunk
                    if len(got) > limit:
                        break
        except requests.RequestException as exc:
            raise self._unreachable(url, exc) from None
        finally:
            resp.close()  # past the cap the rest stays unread: this connection is not reused
        if declared > limit or len(got) > limit:
            raise PacsError(f"PACS '{self.pacs.name}' answered STOW-RS at {url} (HTTP {resp.status_code}) with more "
                            f"than {limit // 1024} KiB, far beyond any STOW-RS answer: the files wait and are sent "
                            "again; check the PACS and any proxy in front of it", transient=True,
                            status=resp.status_code)
        return bytes(got)

    # -- health ----------------------------------------------------------------------------------

    def probe(self) -> None:
        """Raise PacsUnreachable / DestinationProblem / PacsError unless the PACS answers as delivery needs.

        The probe demands no right that delivery does not need. A 403 or 405 to its GET comes from a server
        that answered at the STOW URL and knows who we are, but lets this account or endpoint store only:
        reachable; whether we may store, only a STOW can tell (a STOW 403 marks the PACS down until the next
        probe). A 401 refuses our credentials, which fails a STOW too: down, as is every other answer."""
        if self.pacs.type == "orthanc":
            url = self.pacs.url.rstrip("/") + "/system"
            resp = self._request("GET", url, headers={"Accept": "application/json"})
            self._check_probe(resp, url, what="Orthanc's /system")
        # QIDO as well for Orthanc: /system answers even when the DICOMweb plugin is missing.
        url = f"{self.base}/studies"
        resp = self._request("GET", url, params={"limit": "1"}, headers={"Accept": DICOM_JSON})
        self._check_probe(resp, url, what="QIDO-RS")

    def _check_probe(self, resp: requests.Response, url: str, *, what: str) -> None:
        if resp.status_code in _STORE_ONLY:
            return  # the server is there and accepted who we are; it merely will not answer this GET
        self._check(resp, url, what=what)

    # -- QIDO-RS ---------------------------------------------------------------------------------

    def search(self, level: str = "studies", params: dict | None = None, study_uid: str | None = None,
               series_uid: str | None = None) -> list[dict]:
        """QIDO-RS at `level` (studies, series, instances), optionally inside a study/series."""
        if level not in ("studies", "series", "instances"):
            raise ValueError(f"QIDO level must be studies, series or instances, not {level!r}")
        path = ""
        if study_uid:
            path += f"/studies/{quote(study_uid, safe='')}"
            if series_uid:
                path += f"/series/{quote(series_uid, safe='')}"
        if not (level == "studies" and study_uid):
            path += f"/{level}"
        url = self.base + path
        resp = self._request("GET", url, params=params or None, headers={"Accept": DICOM_JSON})
        if resp.status_code == 204:
            return []
        self._check(resp, url, what="QIDO-RS")
        doc = _json_or_none(resp.content)
        if doc is None and not resp.content.strip():
            return []
        if not isinstance(doc, list):
            raise PacsError(f"PACS '{self.pacs.name}': QIDO-RS at {url} did not answer a DICOM JSON array",
                            transient=True, status=resp.status_code)
        return [d for d in doc if isinstance(d, dict)]

    def instance_exists(self, study_uid: str, sop_uid: str) -> bool:
        """True when QIDO finds this SOPInstanceUID in this study."""
        try:
            found = self.search("instances", {"SOPInstanceUID": sop_uid}, study_uid=study_uid)
        except DestinationProblem as exc:
            # Some servers answer 404 for a study they do not have; the probe catches real 404s.
            if exc.status == 404:
                return False
            raise
        return any(dicomjson.first(d, "00080018") == sop_uid for d in found)

    # -- WADO-RS ---------------------------------------------------------------------------------

    def retrieve_study(self, study_uid: str, out_dir: Path,
                       progress: Callable[[int], None] | None = None) -> list[Path]:
        """WADO-RS a whole study into out_dir/<SOPInstanceUID>.dcm, streamed part by part.

        `progress`, when given, is called with the number of instances written so far."""
        url = f"{self.base}/studies/{quote(study_uid, safe='')}"
        headers = {"Accept": 'multipart/related; type="application/dicom"'}
        resp = self._request("GET", url, headers=headers, stream=True)
        with resp:
            if resp.status_code == 404:
                raise PacsError(f"PACS '{self.pacs.name}': study {study_uid} not found at {url} (HTTP 404)",
                                transient=False, status=404)
            self._check(resp, url, what="WADO-RS")
            boundary = _boundary_of(resp.headers.get("Content-Type", ""))
            if boundary is None:
                raise PacsError(f"PACS '{self.pacs.name}': WADO-RS at {url} answered "
                                f"{resp.headers.get('Content-Type')!r}, not multipart/related",
                                transient=False, status=resp.status_code)
            out_dir.mkdir(parents=True, exist_ok=True)
            try:
                return _MultipartWriter(boundary, out_dir, progress).run(resp.iter_content(CHUNK_SIZE))
            except requests.RequestException as exc:
                raise self._unreachable(url, exc) from None

    # -- helpers ---------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            if (method == "GET" and _broke_under_us(exc)) or (method == "POST" and _dropped_without_answer(exc)):
                # A PACS drops idle keep-alive connections (Orthanc after a second): one reused just as it
                # closed breaks without an answer. A GET changes nothing, so it goes once more on a fresh
                # connection; a health probe would otherwise report a healthy PACS down. A STOW goes once more
                # only when not a byte of answer came (the PACS may have stored some files, but a duplicate
                # counts as delivered); else the whole PACS was marked down until the next probe. Never after
                # a timeout: a PACS that is merely slow must not get the upload twice.
                try:
                    return self.session.request(method, url, timeout=self.timeout, **kwargs)
                except requests.RequestException as again:
                    raise self._unreachable(url, again) from None
            raise self._unreachable(url, exc) from None

    def _unreachable(self, url: str, exc: BaseException) -> PacsUnreachable:
        name, env = self.pacs.name, env_prefix(self.pacs)
        product = "Orthanc" if self.pacs.type == "orthanc" else "the PACS"
        what = _why(exc, self.pacs)
        sent = not _never_sent(exc)
        hint = f"is {product} running? check {env}URL / [pacs.{name}] url, DNS, firewall"
        if sent and not isinstance(exc, requests.exceptions.ReadTimeout):
            hint = (f"the connection broke during the request ({product} restarting, or a proxy or firewall "
                    "cutting it); the files are retried")
        if isinstance(exc, requests.exceptions.SSLError):
            hint = (f"check the PACS's certificate and [pacs.{name}] ca_bundle (the CA that signed it), "
                    "client_cert / client_key")
        elif isinstance(exc, requests.exceptions.ReadTimeout):
            hint = (f"the PACS accepted the connection but is overloaded or stuck; raise [pacs.{name}] "
                    "read_timeout if it is merely slow")
        return PacsUnreachable(f"PACS '{name}' unreachable at {url}: {what}: {hint}", sent=sent)

    def _raise_for_destination(self, resp: requests.Response, url: str) -> None:
        status = resp.status_code
        name, env = self.pacs.name, env_prefix(self.pacs)
        if status == 401:
            if self.pacs.oauth2_token_url:
                creds = f"client_id / client_secret (or client_secret_file) in [pacs.{name}]"
            elif self.pacs.token or self.pacs.token_file:
                creds = f"{env}TOKEN (or token_file in [pacs.{name}])"
            elif self.pacs.username:
                creds = (f"{env}USERNAME / {env}PASSWORD (or password_file in [pacs.{name}]); "
                         f"user {self.pacs.username!r} was refused")
            else:
                creds = f"the PACS wants a login: set {env}USERNAME and {env}PASSWORD (or password_file)"
            raise DestinationProblem(f"PACS '{name}' refused our credentials at {url} (HTTP 401): check {creds}",
                                     status=status)
        if status == 403:
            who = f"user {self.pacs.username!r}" if self.pacs.username else "our credentials"
            raise DestinationProblem(
                f"PACS '{name}' denied access at {url} (HTTP 403): {who} lacks the permission; "
                f"grant it on the PACS or check {env}USERNAME / {env}PASSWORD (or password_file)", status=status)
        if status in (404, 405, 415):
            raise DestinationProblem(
                f"PACS '{name}': DICOMweb endpoint not found at {url} (HTTP {status}): is the DICOMweb plugin "
                f"installed/enabled? check [pacs.{name}] type ({self.pacs.type!r}) / dicomweb_root, "
                f"and {env}URL", status=status)

    def _check(self, resp: requests.Response, url: str, *, what: str) -> None:
        """Raise for any answer but 2xx: destination problems first, then a transient PacsError."""
        self._raise_for_destination(resp, url)
        if not 200 <= resp.status_code <= 299:
            transient = resp.status_code in (408, 429) or resp.status_code >= 500
            raise PacsError(f"PACS '{self.pacs.name}': {what} at {url} answered HTTP {resp.status_code}",
                            transient=transient, status=resp.status_code)


class _MultipartWriter:
    """Streams a multipart/related answer into one file per part, holding at most a chunk in memory."""

    def __init__(self, boundary: str, out_dir: Path, progress: Callable[[int], None] | None):
        self.delim = b"--" + boundary.encode("ascii")
        self.out_dir = out_dir
        self.progress = progress
        self.written: list[Path] = []
        self._fh: Any = None
        self._tmp: Path | None = None

    def run(self, chunks: Iterator[bytes]) -> list[Path]:
        """Consume the response chunks; return the files written."""
        buf = b""
        state = "preamble"
        try:
            for chunk in chunks:
                buf += chunk
                buf, state = self._feed(buf, state)
                if state == "end":
                    break
            if state != "end":
                raise PacsError(f"WADO-RS answer ended before its closing boundary ({len(self.written)} "
                                "instances received): connection cut?", transient=True)
        finally:
            if self._fh is not None:
                self._fh.close()
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)
        return self.written

    def _feed(self, buf: bytes, state: str) -> tuple[bytes, str]:
        while True:
            if state == "preamble":
                i = buf.find(self.delim)
                if i < 0:
                    return buf[-len(self.delim):], state
                buf, state = buf[i + len(self.delim):], "after_delim"
            if state == "after_delim":
                if len(buf) < 2:
                    return buf, state
                if buf.startswith(b"--"):
                    return b"", "end"
                j = buf.find(b"\r\n")
                if j < 0:
                    return self._guard(buf), state
                buf, state = buf[j + 2:], "headers"
            if state == "headers":
                if buf.startswith(b"\r\n"):  # a part without headers
                    buf = buf[2:]
                else:
                    j = buf.find(b"\r\n\r\n")
                    if j < 0:
                        return self._guard(buf), state
                    buf = buf[j + 4:]
                self._open()
                state = "body"
            if state == "body":
                end = buf.find(b"\r\n" + self.delim)
                if end < 0:
                    # Keep a tail that may hold the start of the next delimiter.
                    keep = len(self.delim) + 1
                    if len(buf) > keep:
                        self._fh.write(buf[:-keep])
                        buf = buf[-keep:]
                    return buf, state
                self._fh.write(buf[:end])
                self._finish()
                buf, state = buf[end + 2:], "preamble"

    def _guard(self, buf: bytes) -> bytes:
        if len(buf) > _MAX_PART_HEADERS:
            raise PacsError("WADO-RS answer has a malformed part header", transient=False)
        return buf

    def _open(self) -> None:
        self._tmp = self.out_dir / f".wado-{len(self.written):06d}-{secrets.token_hex(4)}.part"
        self._fh = open(self._tmp, "wb")

    def _finish(self) -> None:
        assert self._fh is not None and self._tmp is not None
        self._fh.close()
        self._fh = None
        tmp, self._tmp = self._tmp, None
        uid = _sop_uid_of(tmp)
        name = f"{uid}.dcm" if uid else f"part-{len(self.written):06d}.dcm"
        final = self.out_dir / name
        os.replace(tmp, final)
        self.written.append(final)
        if self.progress is not None:
            self.progress(len(self.written))


def _sop_uid_of(path: Path) -> str | None:
    """The file's SOPInstanceUID when it is a plausible UID (it becomes a file name)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
        uid = str(ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID", "")).strip()
    except Exception:  # noqa: BLE001 - any unreadable part is still kept, under a neutral name
        return None
    # A UID from the network becomes a path: digits and dots only, so no "../" can sneak in.
    return uid if is_uid(uid) else None


def _boundary_of(content_type: str) -> str | None:
    if not content_type.lower().startswith("multipart/"):
        return None
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    return (m.group(1) or m.group(2)) if m else None


def _never_sent(exc: BaseException) -> bool:
    """True when a request failed before any connection was made (refused, DNS, connect timeout, TLS)."""
    if isinstance(exc, (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError)):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", exc.args[0])  # urllib3's MaxRetryError wraps the cause
        return isinstance(reason, urllib3.exceptions.NewConnectionError)
    return False


def _broke_under_us(exc: BaseException) -> bool:
    """True when a connection broke during a request: neither refused (nothing sent) nor a timeout."""
    return (isinstance(exc, requests.exceptions.ConnectionError)
            and not isinstance(exc, (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError))
            and not _never_sent(exc))


def _dropped_without_answer(exc: BaseException) -> bool:
    """True when the connection was closed or reset before any byte of the answer (the PACS closing an idle
    keep-alive connection as we reused it): urllib3's 'Connection aborted.' with such a cause. An answer cut
    off after its header is not this (requests raises ChunkedEncodingError or a 'Connection broken' error)."""
    if not isinstance(exc, requests.exceptions.ConnectionError) or isinstance(exc, requests.exceptions.ConnectTimeout):
        return False
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", None) or reason  # urllib3's MaxRetryError wraps the cause
    return (isinstance(reason, urllib3.exceptions.ProtocolError) and len(reason.args) > 1
            and isinstance(reason.args[1], (ConnectionResetError, BrokenPipeError)))  # RemoteDisconnected too


def _json_or_none(content: bytes) -> Any:
    # Orthanc's non-200 answers carry no Content-Type, so parse regardless of the header.
    if not content or not content.strip():
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _why(exc: BaseException, pacs: PacsConfig) -> str:
    """A few words for what went wrong on the wire, from a requests exception."""
    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no connection within {pacs.connect_timeout:g} s (connect_timeout)"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return f"no answer within {pacs.read_timeout:g} s (read_timeout)"
    if isinstance(exc, requests.exceptions.SSLError):
        if "CERTIFICATE_VERIFY_FAILED" in text:
            detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip(" )'\"")
            return f"TLS certificate verification failed ({detail or 'untrusted certificate'})"
        return "TLS handshake failed"
    if "Connection refused" in text:
        return "connection refused (nothing listening on that port)"
    if "Name or service not known" in text or "Temporary failure in name resolution" in text \
            or "nodename nor servname" in text:
        return "host name not found (DNS)"
    if "No route to host" in text or "Network is unreachable" in text:
        return "no route to host"
    if "timed out" in text:
        return "timed out"
    return f"connection failed ({type(exc).__name__})"
