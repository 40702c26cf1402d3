"""A checker of DICOM audit messages against the structure of the PS3.15 A.5.1 schema (RELAX NG): element
order and counts, required attributes, enumerated values, coded values, base64 details. Written from the
standard's schema for the tests; `check(xml)` raises AssertionError naming what is wrong."""

from __future__ import annotations

import base64
import re
from datetime import datetime
from xml.etree import ElementTree as ET

CODED = {"csd-code", "codeSystemName", "originalText"}  # required; displayName may join them
OUTCOMES = {"0", "4", "8", "12"}
ACTIONS = {"C", "R", "U", "D", "E"}
BOOLEANS = {"true", "false", "1", "0"}


def check(xml: bytes) -> ET.Element:
    """Parse one message and check it; return its root."""
    assert xml.startswith(b"<?xml"), "the XML declaration comes first"
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage", root.tag
    _attrs(root, set(), set())
    _order(root, [("EventIdentification", "1"), ("ActiveParticipant", "+"), ("AuditSourceIdentification", "1"),
                  ("ParticipantObjectIdentification", "*")])
    _event(root.find("EventIdentification"))
    for p in root.findall("ActiveParticipant"):
        _participant(p)
    _source(root.find("AuditSourceIdentification"))
    for o in root.findall("ParticipantObjectIdentification"):
        _object(o)
    return root


def coded(el: ET.Element | None) -> tuple[str, str, str]:
    """(csd-code, codeSystemName, originalText) of a coded element."""
    assert el is not None, "coded element missing"
    return el.get("csd-code", ""), el.get("codeSystemName", ""), el.get("originalText", "")


def _order(el: ET.Element, spec: list[tuple[str, str]]) -> None:
    """The children of `el` are, in this order, the tags of `spec` with counts "1", "?", "*" or "+"."""
    pattern = "".join(f"(?:{re.escape(tag)};){'' if n == '1' else n}" for tag, n in spec)
    seen = "".join(f"{child.tag};" for child in el)
    assert re.fullmatch(pattern, seen), f"<{el.tag}> children {seen!r} do not follow {spec}"


def _attrs(el: ET.Element, required: set[str], optional: set[str]) -> None:
    have = set(el.attrib)
    assert required <= have, f"<{el.tag}> lacks {sorted(required - have)}"
    assert have <= required | optional, f"<{el.tag}> has attributes the schema does not know: {sorted(have - required - optional)}"
    for name in required:
        assert el.get(name) is not None


def _coded(el: ET.Element) -> None:
    _attrs(el, CODED, {"displayName"})
    assert el.get("csd-code") and el.get("codeSystemName") and el.get("originalText"), ET.tostring(el)
    assert len(el) == 0


def _event(ev: ET.Element) -> None:
    _attrs(ev, {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"})
    if ev.get("EventActionCode") is not None:
        assert ev.get("EventActionCode") in ACTIONS
    assert ev.get("EventOutcomeIndicator") in OUTCOMES
    stamp = datetime.fromisoformat(ev.get("EventDateTime", ""))
    assert stamp.tzinfo is not None, "EventDateTime shall include the time zone (A.5.2.5)"
    _order(ev, [("EventID", "1"), ("EventTypeCode", "*"), ("EventOutcomeDescription", "?")])
    for child in ev:
        if child.tag != "EventOutcomeDescription":
            _coded(child)


def _participant(p: ET.Element) -> None:
    _attrs(p, {"UserID", "UserIsRequestor"}, {"AlternativeUserID", "UserName", "NetworkAccessPointID",
                                               "NetworkAccessPointTypeCode"})
    assert p.get("UserIsRequestor") in BOOLEANS
    if p.get("NetworkAccessPointTypeCode") is not None:
        assert p.get("NetworkAccessPointTypeCode") in {"1", "2", "3", "4", "5"}
        assert p.get("NetworkAccessPointID"), "a type code without the access point"
    _order(p, [("RoleIDCode", "*"), ("MediaIdentifier", "?")])
    for role in p.findall("RoleIDCode"):
        _coded(role)


def _source(s: ET.Element) -> None:
    _attrs(s, {"AuditSourceID"}, {"AuditEnterpriseSiteID"})
    assert s.get("AuditSourceID")
    _order(s, [("AuditSourceTypeCode", "*")])
    for code in s:
        _attrs(code, {"csd-code"}, CODED | {"displayName"})
        if code.get("csd-code") not in set("123456789"):
            assert code.get("codeSystemName"), "a code beyond 1-9 needs its codeSystemName"


def _object(o: ET.Element) -> None:
    _attrs(o, {"ParticipantObjectID"}, {"ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
                                        "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"})
    if o.get("ParticipantObjectTypeCode") is not None:
        assert o.get("ParticipantObjectTypeCode") in {"1", "2", "3", "4"}
    if o.get("ParticipantObjectTypeCodeRole") is not None:
        assert o.get("ParticipantObjectTypeCodeRole") in {str(n) for n in range(1, 27)}
    tags = [child.tag for child in o]
    assert not ("ParticipantObjectName" in tags and "ParticipantObjectQuery" in tags), "a name or a query, not both"
    _order(o, [("ParticipantObjectIDTypeCode", "1"), ("ParticipantObjectName", "?"), ("ParticipantObjectQuery", "?"),
               ("ParticipantObjectDetail", "*"), ("ParticipantObjectDescription", "*")])
    _coded(o.find("ParticipantObjectIDTypeCode"))
    for detail in o.findall("ParticipantObjectDetail"):
        _attrs(detail, {"type", "value"}, set())
        base64.b64decode(detail.get("value", ""), validate=True)
    for description in o.findall("ParticipantObjectDescription"):
        _order(description, [("MPPS", "*"), ("Accession", "*"), ("SOPClass", "*"),
                             ("ParticipantObjectContainsStudy", "?"), ("Encrypted", "?"), ("Anonymized", "?")])
        for accession in description.findall("Accession"):
            _attrs(accession, {"Number"}, set())
        for sop in description.findall("SOPClass"):
            _attrs(sop, {"NumberOfInstances"}, {"UID"})
            int(sop.get("NumberOfInstances", ""))
            _order(sop, [("Instance", "*")])
