"""Files that validation once refused although a PACS files them: forwarded to a real Orthanc."""

from __future__ import annotations

import json
import shutil
import struct

import pydicom
from pydicom.data import get_testdata_file

from tests.dicomfactory import CT_SMALL, MR_SMALL, fresh
from tests.integration.pipeline_helpers import captured_log, files, make_config, pacs_table, running, wait_for


def test_a_meta_header_naming_another_instance_is_filed_by_the_data_sets_uid(tmp_path, clean_orthanc):
    """pydicom's rtplan.dcm names two SOP instances; Orthanc files it by the data set's, and so do we."""
    plan = get_testdata_file("rtplan.dcm")
    ds = pydicom.dcmread(plan, stop_before_pixels=True)
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)})
    with running(config), captured_log() as log:
        shutil.copy(plan, tmp_path / "spool" / "inbox" / "plan.dcm")
        assert wait_for(lambda: len(files(tmp_path, "sent")) == 1)
    assert clean_orthanc.list_instance_uids() == {ds.SOPInstanceUID}
    warned = [line for line in log if "plan.dcm" in line and "file meta names SOP instance" in line]
    assert warned and warned[0].startswith("WARNING") and ds.file_meta.MediaStorageSOPInstanceUID in warned[0]


def test_the_strict_setting_keeps_refusing_such_a_file(tmp_path, clean_orthanc):
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)}, strict_meta_uid=True)
    with running(config):
        shutil.copy(get_testdata_file("rtplan.dcm"), tmp_path / "spool" / "inbox" / "plan.dcm")
        assert wait_for(lambda: len(files(tmp_path, "failed")) == 1)
    (failed,) = files(tmp_path, "failed")
    sidecar = json.loads(failed.with_name(failed.name + ".error.json").read_text())
    assert sidecar["stage"] == "validation" and "MediaStorageSOPInstanceUID" in sidecar["reason"]
    assert clean_orthanc.count_instances() == 0


def test_spectroscopy_reaches_the_pacs_and_a_zip_like_preamble_is_sent_as_dicom(tmp_path, clean_orthanc):
    """MR Spectroscopy has Rows but no pixel data: Orthanc stores it. A preamble may start with PK: it is
    DICOM, sent as such, never unpacked or failed as a zip by us (Orthanc 1.10 itself takes such a part for
    a zip and does not store it: the file then fails at the delivery stage, with Orthanc's answer)."""
    mrs = fresh(MR_SMALL)
    del mrs.PixelData
    mrs.SOPClassUID = mrs.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.2"
    mrs.add_new(0x56000020, "OF", struct.pack("<8f", *range(8)))
    polyglot = fresh(CT_SMALL)
    polyglot.preamble = b"PK\x03\x04" + b"\0" * 124
    staging = tmp_path / "staging"
    staging.mkdir()
    mrs.save_as(staging / "mrs.dcm", enforce_file_format=True)
    polyglot.save_as(staging / "pk.dcm", enforce_file_format=True)
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)})
    with running(config):
        for name in ("mrs.dcm", "pk.dcm"):
            shutil.move(staging / name, tmp_path / "spool" / "inbox" / name)
        assert wait_for(lambda: len(files(tmp_path, "sent")) + len(files(tmp_path, "failed")) == 2)
    assert [p.name for p in files(tmp_path, "sent")] == ["mrs.dcm"]
    assert mrs.SOPInstanceUID in clean_orthanc.list_instance_uids()
    for failed in files(tmp_path, "failed"):
        sidecar = json.loads(failed.with_name(failed.name + ".error.json").read_text())
        assert failed.name == "pk.dcm" and sidecar["stage"] == "delivery", sidecar
        assert sidecar["pacs"]["orthanc"]["attempts"] >= 1
