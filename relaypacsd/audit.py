"""DICOM audit messages (PS3.15 Annex A.5, the IHE ATNA format) as XML: Application Activity (A.5.3.1),
DICOM Instances Transferred (A.5.3.7) and Security Alert (A.5.3.11).

The element order and the attributes follow the standard's schema (A.5.1, RELAX NG): EventIdentification,
ActiveParticipant+, AuditSourceIdentification, ParticipantObjectIdentification*. Pure functions: no I/O.
Patient names never appear here (see `_patient`); `audit_syslog.py` sends the bytes.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree as ET

PROCESS_NAME = "relaypacsd"


@dataclass(frozen=True)
class Code:
    """A coded value (PS3.15 A.5.1 CodedValueType): csd-code, codeSystemName, originalText (the meaning)."""

    code: str
    system: str
    meaning: str


# Codes of PS3.16 (DCM) and of RFC 3881, as PS3.15 A.5.3 names them.
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")  # CID 403
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

# EventOutcomeIndicator (A.5.1): success, minor failure, serious failure, major failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
APPLICATION_SERVER = "4"  # AuditSourceTypeCode: an application server process (A.5.1.2.1)
# ParticipantObjectTypeCode and ...TypeCodeRole (A.5.1.2.2)
PERSON, SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_MASTER_FILE = "1", "3", "5"


@dataclass(frozen=True)
class Identity:
    """This gateway in every message: the audit source and the application's active participant."""

    source_id: str  # AuditSourceID, also the application's UserID
    hostname: str  # NetworkAccessPointID
    ae_titles: tuple[str, ...] = ()  # the calling AE titles it uses (A.5.2.2)

    def participant(self, role: Code, requestor: bool, ae_titles: Iterable[str] | None = None) -> "Participant":
        """The application as an active participant in `role`."""
        titles = tuple(self.ae_titles if ae_titles is None else ae_titles)
        return Participant(self.source_id, role, requestor, alt_user_id=_ae_titles(titles),
                           user_name=PROCESS_NAME, access_point=self.hostname)


@dataclass(frozen=True)
class Participant:
    """One ActiveParticipant: who took part, in which role, and where it is on the network."""

    user_id: str
    role: Code | None
    requestor: bool
    alt_user_id: str = ""
    user_name: str = ""
    access_point: str = ""  # a host name or an IP address


@dataclass(frozen=True)
class Peer:
    """A destination as the audit messages name it: its STOW-RS URL, its AE title, our name for it."""

    url: str
    ae_title: str = ""
    name: str = ""

    def participant(self) -> Participant:
        """The destination's ActiveParticipant (Destination Role ID, not the requestor)."""
        return Participant(self.url, ROLE_DESTINATION, False, alt_user_id=_ae_titles((self.ae_title,)),
                           user_name=self.name, access_point=urlsplit(self.url).hostname or "")


@dataclass
class Transfer:
    """The instances of one study (and one patient) that one batch settled at one destination."""

    study_uid: str
    patient_id: str
    peer: Peer
    calling_ae: str = ""
    accession: str = ""
    route: str = ""
    sop_classes: dict[str, int] = field(default_factory=dict)  # SOP Class UID -> instances
    delivered: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # outcome -> instances not delivered

    def add(self, sop_class: str, delivered: bool, outcome: str) -> None:
        """Count one instance."""
        self.sop_classes[sop_class] = self.sop_classes.get(sop_class, 0) + 1
        if delivered:
            self.delivered += 1
        else:
            self.failed[outcome] = self.failed.get(outcome, 0) + 1


def peer_of(pacs: Any) -> Peer:
    """The Peer of a PacsConfig: the URL without its query (it may hold a token), the AE title, the name."""
    parts = urlsplit(pacs.stow_base)
    return Peer(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), pacs.ae_title, pacs.name)


def transfers(peer: Peer, calling_ae: str, settled: Iterable[tuple[Any, Any]]) -> list[Transfer]:
    """Group one batch's settled (item, update) pairs by study, patient and route: one Transfer each."""
    groups: dict[tuple[str, str, str], Transfer] = {}
    for item, update in settled:
        info = item.info
        patient = getattr(info, "patient_id", "") or ""
        route = getattr(item, "route", "") or ""
        key = (info.study_instance_uid, patient, route)
        transfer = groups.get(key)
        if transfer is None:
            transfer = groups[key] = Transfer(info.study_instance_uid, patient, peer, calling_ae,
                                              getattr(info, "accession_number", "") or "", route)
        why = update.event if update.code is None else f"{update.event} 0x{update.code:04X}"  # the PACS's reason code
        transfer.add(info.sop_class_uid, update.state == "delivered", why)
    return list(groups.values())


# -- the three messages -------------------------------------------------------------------------------------

def application_activity(identity: Identity, start: bool, launcher: str, when: float) -> bytes:
    """Application Activity (A.5.3.1): this gateway started or stopped; `launcher` is the OS user running it."""
    root = _message(APPLICATION_ACTIVITY, "E", when, SUCCESS, [APPLICATION_START if start else APPLICATION_STOP])
    _participant(root, identity.participant(ROLE_APPLICATION, False))
    if launcher:
        _participant(root, Participant(launcher, ROLE_LAUNCHER, True))
    _source(root, identity)
    return _bytes(root)


def instances_transferred(identity: Identity, transfer: Transfer, when: float) -> bytes:
    """DICOM Instances Transferred (A.5.3.7): one study's instances settled at one destination.

    EventActionCode "R": the standard's choice for an audit source that is not the receiver."""
    failed = sum(transfer.failed.values())
    total = transfer.delivered + failed
    outcome = SUCCESS if not failed else (MINOR_FAILURE if transfer.delivered else SERIOUS_FAILURE)
    description = ""
    if failed:
        why = ", ".join(f"{o} {n}" for o, n in sorted(transfer.failed.items()))
        description = f"{failed} of {total} instance(s) not delivered ({why})"
    root = _message(INSTANCES_TRANSFERRED, "R", when, outcome, [], description)
    calling = (transfer.calling_ae,) if transfer.calling_ae else ()
    _participant(root, identity.participant(ROLE_SOURCE, True, calling))
    _participant(root, transfer.peer.participant())
    _source(root, identity)
    study = _object(root, transfer.study_uid, SYSTEM_OBJECT, ROLE_REPORT, STUDY_INSTANCE_UID)
    if transfer.route:
        _detail(study, "Route", transfer.route)
    description_el = ET.SubElement(study, "ParticipantObjectDescription")
    if transfer.accession:
        ET.SubElement(description_el, "Accession", Number=transfer.accession)
    for uid, count in sorted(transfer.sop_classes.items()):
        ET.SubElement(description_el, "SOPClass", UID=uid, NumberOfInstances=str(count))
    _patient(root, transfer.patient_id)
    return _bytes(root)


def security_alert(identity: Identity, subject_uri: str, description: str, outcome: str, when: float) -> bytes:
    """Security Alert (A.5.3.11), Software Configuration: the configuration at `subject_uri` was reloaded
    (outcome SUCCESS) or a reload was refused (MINOR_FAILURE: the previous configuration stays)."""
    root = _message(SECURITY_ALERT, "E", when, outcome, [SOFTWARE_CONFIGURATION])
    _participant(root, identity.participant(ROLE_APPLICATION, False))
    _source(root, identity)
    subject = _object(root, subject_uri, SYSTEM_OBJECT, ROLE_MASTER_FILE, URI)
    _detail(subject, "Alert Description", description)
    return _bytes(root)


def changed_sections(old: Any, new: Any) -> list[str]:
    """The config sections a reload changed ("delivery", "pacs.orthanc", ...), for the alert's description.
    Names only, never values: some are secrets."""
    changed = [f.name for f in fields(old) if f.name not in ("pacs", "source")
               and getattr(old, f.name) != getattr(new, f.name)]
    names = sorted(set(old.pacs) | set(new.pacs))
    changed += [f"pacs.{n}" for n in names if old.pacs.get(n) != new.pacs.get(n)]
    return changed


# -- the schema's building blocks ---------------------------------------------------------------------------

def _message(event: Code, action: str, when: float, outcome: str, types: list[Code],
             outcome_description: str = "") -> ET.Element:
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", EventActionCode=action, EventDateTime=_when(when),
                          EventOutcomeIndicator=outcome)
    _code(ident, "EventID", event)
    for code in types:
        _code(ident, "EventTypeCode", code)
    if outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _one_line(outcome_description)
    return root


def _participant(root: ET.Element, p: Participant) -> None:
    el = ET.SubElement(root, "ActiveParticipant", UserID=p.user_id, UserIsRequestor="true" if p.requestor else "false")
    if p.alt_user_id:
        el.set("AlternativeUserID", p.alt_user_id)
    if p.user_name:
        el.set("UserName", p.user_name)
    if p.access_point:
        el.set("NetworkAccessPointID", p.access_point)
        el.set("NetworkAccessPointTypeCode", "2" if _is_ip(p.access_point) else "1")
    if p.role is not None:
        _code(el, "RoleIDCode", p.role)


def _source(root: ET.Element, identity: Identity) -> None:
    el = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=identity.source_id)
    ET.SubElement(el, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})


def _object(root: ET.Element, object_id: str, type_code: str, role: str, id_type: Code) -> ET.Element:
    el = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=object_id,
                       ParticipantObjectTypeCode=type_code, ParticipantObjectTypeCodeRole=role)
    _code(el, "ParticipantObjectIDTypeCode", id_type)
    return el


def _patient(root: ET.Element, patient_id: str) -> None:
    """The patient participant object: the Patient ID only. PS3.15 allows the patient's name as
    ParticipantObjectName (optional, "U"); it is left out on purpose: audit messages travel as syslog
    and land in log stores, and patient names never appear in our logs. The ID is enough to find them."""
    _object(root, patient_id, PERSON, ROLE_PATIENT, PATIENT_NUMBER)


def _detail(el: ET.Element, kind: str, text: str) -> None:
    """A ParticipantObjectDetail: the value is base64 (A.5.1 ValuePair)."""
    ET.SubElement(el, "ParticipantObjectDetail", type=kind, value=base64.b64encode(text.encode()).decode("ascii"))


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning})


def _ae_titles(titles: Iterable[str]) -> str:
    """AlternativeUserID of a DICOM application (A.5.2.2): "AETITLES=A;B", or '' without AE titles."""
    unique = list(dict.fromkeys(t for t in titles if t))
    return "AETITLES=" + ";".join(unique) if unique else ""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _when(t: float) -> str:
    """xsd:dateTime in UTC with its zone (A.5.2.5), to the millisecond."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _one_line(text: str) -> str:
    """One syslog line per message: rsyslog and many repositories escape or split at control characters."""
    return " ".join(text.split())


# What XML 1.0 cannot hold (control characters, lone surrogates from undecodable bytes): a DICOM value may.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _bytes(root: ET.Element) -> bytes:
    """The message as UTF-8 XML with its declaration, on one line (ElementTree's own puts a line break after it).
    Characters XML cannot hold become U+FFFD, so a damaged Patient ID never makes the whole message invalid."""
    for el in root.iter():
        for key, value in el.attrib.items():
            if _NOT_XML.search(value):
                el.set(key, _NOT_XML.sub("\ufffd", value))
        if el.text and _NOT_XML.search(el.text):
            el.text = _NOT_XML.sub("\ufffd", el.text)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode").encode("utf-8")
