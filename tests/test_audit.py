"""The audit messages (PS3.15 A.5): parsed back and checked against the schema's structure and the codes
A.5.3 requires for Application Activity, DICOM Instances Transferred and Security Alert."""

from __future__ import annotations

import base64
import dataclasses
from types import SimpleNamespace
from xml.etree import ElementTree as ET

import pytest

from relaypacsd import audit
from relaypacsd.config import PacsConfig, Secret, build_config
from relaypacsd.journal import Update
from tests.audit_schema import check, coded

GW = audit.Identity("RELAYPACS_GW", "gw1.example.org", ("RELAYPACS_GW",))
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
WHEN = 1_790_000_000.25


def _participants(root):
    return {coded(p.find("RoleIDCode"))[0]: p for p in root.findall("ActiveParticipant")}


def _objects(root):
    return {coded(o.find("ParticipantObjectIDTypeCode"))[:2]: o for o in root.findall("ParticipantObjectIdentification")}


def _item(study="1.2.3", sop_class=CT, patient="PAT-1", accession="ACC-9", **extra):
    info = SimpleNamespace(study_instance_uid=study, sop_class_uid=sop_class, patient_id=patient,
                           accession_number=accession, patient_name="DOE^JANE")
    return SimpleNamespace(info=info, **extra)


def _settled(item, state="delivered", event="delivered"):
    return item, Update("/spool/sending/x.dcm", "orthanc", state, event)


@pytest.mark.parametrize("start, type_code", [(True, "110120"), (False, "110121")])
def test_application_activity_has_the_codes_of_a_5_3_1(start, type_code):
    root = check(audit.application_activity(GW, start, "relaypacs", WHEN))
    ev = root.find("EventIdentification")
    assert coded(ev.find("EventID")) == ("110100", "DCM", "Application Activity")
    assert [coded(t)[0] for t in ev.findall("EventTypeCode")] == [type_code]
    assert ev.get("EventActionCode") == "E" and ev.get("EventOutcomeIndicator") == "0"
    assert ev.get("EventDateTime") == "2026-09-21T14:13:20.250+00:00"
    parts = _participants(root)
    app, launcher = parts["110150"], parts["110151"]
    assert app.get("UserID") == "RELAYPACS_GW" and app.get("UserIsRequestor") == "false"
    assert app.get("AlternativeUserID") == "AETITLES=RELAYPACS_GW"  # A.5.2.2: a DICOM application's AE titles
    assert app.get("NetworkAccessPointID") == "gw1.example.org" and app.get("NetworkAccessPointTypeCode") == "1"
    assert launcher.get("UserID") == "relaypacs" and launcher.get("UserIsRequestor") == "true"
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "RELAYPACS_GW"
    assert root.find("ParticipantObjectIdentification") is None  # "No Participant Objects are needed"


def test_instances_transferred_names_both_ends_the_study_its_sop_classes_and_the_patient():
    peer = audit.Peer("https://pacs.example.org/dicom-web", "BREAST_PACS", "breast")
    settled = [_settled(_item()), _settled(_item()), _settled(_item(sop_class=MR))]
    [transfer] = audit.transfers(peer, "RELAYPACS_GW", settled)
    root = check(audit.instances_transferred(GW, transfer, WHEN))
    ev = root.find("EventIdentification")
    assert coded(ev.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    assert ev.get("EventActionCode") == "R"  # A.5.3.7: the audit source is not the receiver
    assert ev.get("EventOutcomeIndicator") == "0" and ev.find("EventOutcomeDescription") is None
    parts = _participants(root)
    source, dest = parts["110153"], parts["110152"]
    assert coded(source.find("RoleIDCode")) == ("110153", "DCM", "Source Role ID")
    assert (source.get("UserID"), source.get("UserIsRequestor")) == ("RELAYPACS_GW", "true")
    assert source.get("AlternativeUserID") == "AETITLES=RELAYPACS_GW"
    assert coded(dest.find("RoleIDCode")) == ("110152", "DCM", "Destination Role ID")
    assert (dest.get("UserID"), dest.get("UserIsRequestor")) == ("https://pacs.example.org/dicom-web", "false")
    assert dest.get("AlternativeUserID") == "AETITLES=BREAST_PACS" and dest.get("UserName") == "breast"
    assert dest.get("NetworkAccessPointID") == "pacs.example.org"
    objects = _objects(root)
    study = objects[("110180", "DCM")]
    assert coded(study.find("ParticipantObjectIDTypeCode"))[2] == "Study Instance UID"
    assert (study.get("ParticipantObjectID"), study.get("ParticipantObjectTypeCode"),
            study.get("ParticipantObjectTypeCodeRole")) == ("1.2.3", "2", "3")
    description = study.find("ParticipantObjectDescription")
    assert {s.get("UID"): s.get("NumberOfInstances") for s in description.findall("SOPClass")} == {CT: "2", MR: "1"}
    assert [a.get("Number") for a in description.findall("Accession")] == ["ACC-9"]
    patient = objects[("2", "RFC-3881")]
    assert coded(patient.find("ParticipantObjectIDTypeCode"))[2] == "Patient Number"
    assert (patient.get("ParticipantObjectID"), patient.get("ParticipantObjectTypeCode"),
            patient.get("ParticipantObjectTypeCodeRole")) == ("PAT-1", "1", "1")


def test_the_patient_name_never_appears_in_an_audit_message():
    """PS3.15 allows it (ParticipantObjectName, optional); our rule: patient names never reach a log."""
    [transfer] = audit.transfers(audit.Peer("http://pacs/dicom-web"), "", [_settled(_item())])
    xml = audit.instances_transferred(GW, transfer, WHEN)
    root = check(xml)
    assert b"DOE" not in xml and root.find(".//ParticipantObjectName") is None


# The words and codes records.update_for gives a settled instance: (state, event, reason code).
DELIVERED, CONFLICT, REFUSED = ("delivered", "delivered", None), ("failed", "uid_conflict", None), ("failed", "failed", 0xA900)


@pytest.mark.parametrize("answers, indicator, words", [
    ([CONFLICT, REFUSED], "8", "2 of 2 instance(s) not delivered (failed 0xA900 1, uid_conflict 1)"),
    ([DELIVERED, CONFLICT], "4", "1 of 2 instance(s) not delivered (uid_conflict 1)"),
])
def test_instances_that_failed_make_the_outcome_a_failure_with_the_counts(answers, indicator, words):
    settled = [(_item(), Update("x", "orthanc", state, event, code=code)) for state, event, code in answers]
    [transfer] = audit.transfers(audit.Peer("http://pacs/dicom-web"), "", settled)
    ev = check(audit.instances_transferred(GW, transfer, WHEN)).find("EventIdentification")
    assert ev.get("EventOutcomeIndicator") == indicator
    assert ev.find("EventOutcomeDescription").text == words


def test_one_message_per_study_patient_and_route_of_a_batch():
    """A.5.3.7: "This message may only include information about a single patient"."""
    settled = [_settled(_item("1.1", patient="A")), _settled(_item("1.1", patient="A")),
               _settled(_item("1.1", patient="B")), _settled(_item("2.2", patient="A")),
               _settled(_item("1.1", patient="A", route="ct-to-breast"))]
    groups = audit.transfers(audit.Peer("http://pacs/dicom-web"), "", settled)
    assert sorted((t.study_uid, t.patient_id, t.route, t.delivered) for t in groups) == [
        ("1.1", "A", "", 2), ("1.1", "A", "ct-to-breast", 1), ("1.1", "B", "", 1), ("2.2", "A", "", 1)]
    routed = next(t for t in groups if t.route)
    study = _objects(check(audit.instances_transferred(GW, routed, WHEN)))[("110180", "DCM")]
    [detail] = study.findall("ParticipantObjectDetail")
    assert detail.get("type") == "Route" and base64.b64decode(detail.get("value")) == b"ct-to-breast"


def test_an_item_without_route_patient_or_accession_still_makes_a_valid_message():
    """Before routing and the history's DICOM fields exist, items have neither attribute."""
    item = SimpleNamespace(info=SimpleNamespace(study_instance_uid="1.2", sop_class_uid=CT))
    [transfer] = audit.transfers(audit.Peer("http://pacs/dicom-web"), "", [_settled(item)])
    root = check(audit.instances_transferred(GW, transfer, WHEN))
    assert root.find(".//Accession") is None and root.find(".//ParticipantObjectDetail") is None
    assert _objects(root)[("2", "RFC-3881")].get("ParticipantObjectID") == ""


def test_the_destination_url_loses_its_query_which_may_hold_a_token():
    pacs = PacsConfig(name="cloud", url="https://cloud.example.org/dicomweb?access_token=s3cret", ae_title="CLOUD")
    peer = audit.peer_of(pacs)
    assert peer == audit.Peer("https://cloud.example.org/dicomweb", "CLOUD", "cloud")


def test_values_that_are_not_xml_safe_are_escaped():
    [transfer] = audit.transfers(audit.Peer("http://pacs/dicom-web"), "", [_settled(_item(accession='A<&>"1'))])
    root = check(audit.instances_transferred(GW, transfer, WHEN))
    assert root.find(".//Accession").get("Number") == 'A<&>"1'


def test_security_alert_for_a_reload_has_the_codes_of_a_5_3_11():
    root = check(audit.security_alert(GW, "file:///etc/relaypacs/relaypacs.toml", "configuration reloaded\nfrom x",
                                      audit.SUCCESS, WHEN))
    ev = root.find("EventIdentification")
    assert coded(ev.find("EventID")) == ("110113", "DCM", "Security Alert")
    assert [coded(t) for t in ev.findall("EventTypeCode")] == [("110131", "DCM", "Software Configuration")]
    assert ev.get("EventActionCode") == "E" and ev.get("EventOutcomeIndicator") == "0"
    [subject] = root.findall("ParticipantObjectIdentification")
    assert coded(subject.find("ParticipantObjectIDTypeCode")) == ("12", "RFC-3881", "URI")
    assert subject.get("ParticipantObjectID") == "file:///etc/relaypacs/relaypacs.toml"
    assert (subject.get("ParticipantObjectTypeCode"), subject.get("ParticipantObjectTypeCodeRole")) == ("2", "5")
    [detail] = subject.findall("ParticipantObjectDetail")
    assert detail.get("type") == "Alert Description"  # mandatory in A.5.3.11
    assert base64.b64decode(detail.get("value")) == b"configuration reloaded\nfrom x"


def test_changed_sections_name_what_a_reload_changed_but_never_a_value():
    raw = {"watch": [{"path": "/srv/relaypacs/ct"}], "pacs": {"orthanc": {"url": "http://o:8042", "password": "old-pw"}}}
    old = build_config(raw, {})
    new = dataclasses.replace(old, pacs={"orthanc": dataclasses.replace(old.pacs["orthanc"], password=Secret("new-pw"))},
                              delivery=dataclasses.replace(old.delivery, retry_attempts=7))
    changed = audit.changed_sections(old, new)
    assert changed == ["delivery", "pacs.orthanc"]
    assert "pw" not in " ".join(changed)
    assert audit.changed_sections(old, old) == []


@pytest.mark.parametrize("old, new", [
    (b' originalText="DICOM Instances Transferred"', b""),  # a coded value without its meaning
    (b' UserIsRequestor="true"', b""),  # a required attribute
    (b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="1"'),  # not an enumerated value
    (b"+00:00", b""),  # a time without its zone
    (b'NumberOfInstances="2"', b'NumberOfInstances="two"'),
    (b"<AuditSourceIdentification", b"<Extra /><AuditSourceIdentification"),  # an element the schema lacks
])
def test_the_schema_check_itself_catches_a_broken_message(old, new):
    [transfer] = audit.transfers(audit.Peer("http://pacs/dicom-web"), "RELAYPACS_GW", [_settled(_item()), _settled(_item())])
    good = audit.instances_transferred(GW, transfer, WHEN)
    check(good)
    assert old in good
    with pytest.raises((AssertionError, ValueError)):
        check(good.replace(old, new, 1))


def test_the_schema_check_catches_elements_out_of_order():
    root = check(audit.application_activity(GW, True, "relaypacs", WHEN))
    source = root.find("AuditSourceIdentification")
    root.remove(source)
    root.insert(0, source)
    with pytest.raises(AssertionError):
        check(b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root))


def test_characters_xml_cannot_hold_never_break_the_message():
    """A Patient ID read from a damaged file may hold control characters or undecodable bytes."""
    [transfer] = audit.transfers(audit.Peer("http://pacs/dicom-web"), "",
                                 [_settled(_item(patient="P\x01\x1b1\udcff", accession="A\x00"))])
    root = check(audit.instances_transferred(GW, transfer, WHEN))
    assert _objects(root)[("2", "RFC-3881")].get("ParticipantObjectID") == "P\ufffd\ufffd1\ufffd"
    assert root.find(".//Accession").get("Number") == "A\ufffd"
