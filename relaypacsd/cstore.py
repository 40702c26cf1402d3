"""C-STORE (DIMSE, pynetdicom) sender: the fallback for a PACS whose DICOMweb endpoint is unusable.

One association per batch; presentation contexts built from the files' own SOP classes and
transfer syntaxes; each instance's outcome read from its C-STORE response status.

Nagle: pynetdicom does not set TCP_NODELAY, and DCMTK-based servers (Orthanc, storescp) leave Nagle
on unless started with TCP_NODELAY=1. We set it on our client socket from the EVT_CONN_OPEN hook
(the socket is connected, the A-ASSOCIATE-RQ not yet sent). The PACS side matters as much: see
docs/commands.md.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relaypacsd.config import PacsConfig
from relaypacsd.errors import DestinationProblem, PacsError, PacsUnreachable, PartChanged
from relaypacsd.models import Part
from relaypacsd.outcomes import (NOT_AUTHORIZED, NOT_AUTHORIZED_FIX, InstanceResult, Outcome, classify_reason,
                                 describe_reason)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8: odd context IDs 1..255
WARNING_CODES = frozenset({0xB000, 0xB006, 0xB007})


def _set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: switch Nagle off on the connected client socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def classify_status(status: int | None) -> tuple[Outcome, str]:
    """Outcome and words for one C-STORE response Status (PS3.4 B.2.3, PS3.7 C)."""
    if status is None:
        return Outcome.TRANSIENT, "no C-STORE response (association aborted or DIMSE timeout)"
    hexs = f"0x{status:04X}"
    if status == 0x0000:
        return Outcome.DELIVERED, "stored (C-STORE status 0x0000)"
    # The same codes as a STOW FailureReason, decided in one place (a dcm4chee 0xA770 is a duplicate,
    # not "out of resources"; 0x0124 is the PACS's permissions, not the file: it waits).
    outcome = classify_reason(status)
    words = f"C-STORE status {hexs} ({describe_reason(status)})"
    if outcome is Outcome.LIMITED and (status in WARNING_CODES or status & 0xF000 == 0xB000):
        return Outcome.DELIVERED, f"stored with warning {hexs} ({describe_reason(status)})"
    if status == NOT_AUTHORIZED:
        return outcome, f"PACS refused it: {words}: {NOT_AUTHORIZED_FIX}"
    return outcome, {
        Outcome.DUPLICATE: f"PACS already has it: {words}",
        Outcome.TRANSIENT: f"PACS out of resources: {words}",
        Outcome.PERMANENT: f"PACS refused it: {words}",
    }.get(outcome, f"PACS answered {words}")


def _meta(path: Path) -> tuple[str, str]:
    """(SOP class UID, transfer syntax UID) from the file's meta header; '' when absent."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - no usable meta: the dataset read below decides
        return "", ""
    return str(meta.get("MediaStorageSOPClassUID", "")), str(meta.get("TransferSyntaxUID", ""))


class CStoreSender:
    """A destination reached over DIMSE: C-STORE to store, C-ECHO to probe."""

    def __init__(self, pacs: PacsConfig, nodelay: bool = True):
        self.pacs = pacs
        self.name = pacs.name
        self.host = pacs.dicom_host or _host_of(pacs.url) or "127.0.0.1"
        self.port = pacs.dicom_port
        self.called = pacs.ae_title or "ANY-SCP"
        self.calling = pacs.calling_ae_title or "RELAYPACS_GW"
        self.nodelay = nodelay
        self.target = f"dicom://{self.called}@{self.host}:{self.port}"

    # -- association ---------------------------------------------------------------------------

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling)
        ae.connection_timeout = self.pacs.connect_timeout
        ae.acse_timeout = max(self.pacs.connect_timeout, 10.0)
        ae.dimse_timeout = self.pacs.read_timeout
        ae.network_timeout = self.pacs.read_timeout
        return ae

    def _associate(self, ae: AE, contexts: list[Any]):
        connected: list[bool] = []

        def on_open(event: Any) -> None:
            connected.append(True)
            if self.nodelay:
                _set_nodelay(event)

        handlers = [(evt.EVT_CONN_OPEN, on_open)]
        try:
            assoc = ae.associate(self.host, self.port, contexts, ae_title=self.called, evt_handlers=handlers)
        except (OSError, RuntimeError) as exc:
            raise self._unreachable(f"{type(exc).__name__}: {exc}") from None
        if assoc.is_established:
            return assoc
        if not connected:
            raise self._unreachable("connection refused or timed out (nothing listening on that port?)")
        if assoc.is_rejected:
            raise DestinationProblem(
                f"PACS '{self.name}' rejected our association at {self.host}:{self.port} (called AE "
                f"{self.called!r}, calling AE {self.calling!r}): check [pacs.{self.name}] ae_title / "
                f"calling_ae_title and that the PACS knows {self.calling!r} as a modality/peer")
        if assoc.is_aborted:
            raise DestinationProblem(
                f"PACS '{self.name}' aborted our association at {self.host}:{self.port} (called AE "
                f"{self.called!r}, calling AE {self.calling!r}): the PACS does not accept this peer; "
                f"check its list of known AE titles and [pacs.{self.name}] calling_ae_title")
        raise self._unreachable("no answer to our association request within the ACSE timeout")

    def _unreachable(self, what: str) -> PacsUnreachable:
        return PacsUnreachable(
            f"PACS '{self.name}' DICOM port unreachable at {self.host}:{self.port} (called AE {self.called!r}, "
            f"calling AE {self.calling!r}): {what}: is the PACS running? check [pacs.{self.name}] dicom_host / "
            f"dicom_port, firewall")

    # -- Sender protocol ---------------------------------------------------------------------------

    def send(self, parts: list[Part]) -> tuple[list[InstanceResult], int | None]:
        """C-STORE every part over one association; one result per part, in order."""
        if not parts:
            raise ValueError("send() needs at least one part")
        for part in parts:  # as STOW-RS does: a file rewritten since its validation is validated again
            actual = os.stat(part.path).st_size
            if actual != part.size:
                raise PartChanged(part.path, part.size, actual)
        metas = [_meta(p.path) for p in parts]
        contexts = _contexts(metas)
        if not contexts:
            return [InstanceResult(p.sop_uid, Outcome.PERMANENT, None, None,
                                   "no SOP class in the file's meta header: cannot C-STORE it") for p in parts], None
        ae = self._ae()
        assoc = self._associate(ae, contexts)
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        results: list[InstanceResult] = []
        try:
            for i, (part, (sop_class, ts)) in enumerate(zip(parts, metas)):
                if not assoc.is_established:
                    results.append(InstanceResult(part.sop_uid, Outcome.TRANSIENT, None, None,
                                                  "association ended before this instance was sent"))
                    continue
                if sop_class and not _usable(sop_class, ts, accepted):
                    results.append(InstanceResult(
                        part.sop_uid, Outcome.PERMANENT, None, 0x0122,
                        f"PACS accepted no presentation context for SOP class {sop_class} "
                        f"({UID(sop_class).name}) with this file's transfer syntax: it does not store this kind "
                        "of object (or this compression)"))
                    continue
                results.append(self._store_one(assoc, part, i + 1))
        finally:
            if assoc.is_established:
                assoc.release()
        return results, None

    def _store_one(self, assoc: Any, part: Part, msg_id: int) -> InstanceResult:
        try:
            ds = pydicom.dcmread(part.path)
        except OSError as exc:
            return InstanceResult(part.sop_uid, Outcome.TRANSIENT, None, None, f"cannot read file: {exc}")
        except Exception as exc:  # noqa: BLE001
            return InstanceResult(part.sop_uid, Outcome.PERMANENT, None, None, f"not readable as DICOM: {exc}")
        try:
            rsp = assoc.send_c_store(ds, msg_id=msg_id)
        except ValueError as exc:  # no usable presentation context / cannot encode
            return InstanceResult(part.sop_uid, Outcome.PERMANENT, None, 0x0122,
                                  f"no accepted presentation context for this file: {exc}")
        except (AttributeError, RuntimeError) as exc:
            return InstanceResult(part.sop_uid, Outcome.PERMANENT, None, None, f"cannot C-STORE this file: {exc}")
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        outcome, words = classify_status(status)
        return InstanceResult(part.sop_uid, outcome, None, status, words)

    def probe(self) -> None:
        """C-ECHO: raise PacsError unless the PACS accepts our association and answers 0x0000."""
        self.echo()

    def echo(self) -> float:
        """C-ECHO; return its round trip in ms."""
        ae = self._ae()
        started = time.monotonic()
        assoc = self._associate(ae, [build_context(Verification)])
        try:
            rsp = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if status != 0x0000:
            raise PacsError(f"PACS '{self.name}' at {self.host}:{self.port} answered C-ECHO with status "
                            f"{'none' if status is None else hex(status)}: check the PACS's log", transient=True)
        return (time.monotonic() - started) * 1000


def _contexts(metas: list[tuple[str, str]]) -> list[Any]:
    """One context per SOP class with the uncompressed syntaxes, plus one per compressed syntax in use."""
    wanted: "OrderedDict[tuple[str, tuple[str, ...]], None]" = OrderedDict()
    for sop_class, ts in metas:
        if not sop_class:
            continue
        if ts and ts not in UNCOMPRESSED:
            wanted[(sop_class, (ts,))] = None
        wanted[(sop_class, tuple(str(u) for u in UNCOMPRESSED))] = None
    return [build_context(c, list(ts)) for c, ts in list(wanted)[:MAX_CONTEXTS]]


def _usable(sop_class: str, ts: str, accepted: set[tuple[str, str]]) -> bool:
    """True when an accepted context can carry this file (uncompressed syntaxes convert into each other)."""
    if ts and ts not in UNCOMPRESSED:
        return (sop_class, ts) in accepted
    return any((sop_class, str(u)) in accepted for u in UNCOMPRESSED)


def _host_of(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""
