"""The attributes the validation walk reads for routing (#11): decoded as pydicom decodes them, in the file's
character set, on the same walk, never touching pixel data."""

import os
from pathlib import Path

import pydicom
import pydicom.datadict
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import generate_uid

import relaypacsd.dicomfile as dicomfile
from relaypacsd.dicomfile import UNREADABLE_VRS, inspect
from tests.dicomfactory import CT_SMALL, MR_SMALL, fresh, write_instance, write_tagged

SAMPLES = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
           "JPEG2000.dcm", "SC_rgb_rle.dcm", "rtplan.dcm", "rtdose.dcm", "reportsi.dcm", "693_J2KI.dcm"]


def _as_pydicom(value):
    items = list(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
    return tuple("" if v is None else str(v).strip() for v in items)


@pytest.mark.parametrize("name", SAMPLES)
def test_every_top_level_text_and_number_attribute_reads_as_pydicom_reads_it(name):
    """Explicit and implicit VR, big endian, deflated: each value the walk reads equals pydicom's (padding aside)."""
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    keywords = [e.keyword for e in ds if e.keyword and e.VR not in UNREADABLE_VRS and e.tag.group != 2
                and not pydicom.datadict.repeater_has_keyword(e.keyword)]
    assert len(keywords) > 10
    attrs = inspect(path, attributes=keywords).attrs
    assert {k: tuple(v.strip() for v in attrs[k]) for k in keywords} == {k: _as_pydicom(ds[k].value) for k in keywords}


@pytest.mark.parametrize("charset, text, raw", [
    ("ISO_IR 100", "Gehirn für Kinder", b"Gehirn f\xfcr Kinder"),
    ("ISO_IR 192", "脳 MRT – Übersicht", "脳 MRT – Übersicht".encode()),
    ("ISO_IR 144", "Головной мозг", "Головной мозг".encode("iso8859_5")),
])
def test_non_ascii_text_is_decoded_with_the_files_specific_character_set(tmp_path, charset, text, raw):
    path = tmp_path / "a.dcm"
    write_tagged(path, "MR", charset, StudyDescription=text, InstitutionName=f"{text} 2")
    assert raw in path.read_bytes()  # the file really holds the text in that character set
    info = inspect(path, attributes=["StudyDescription", "InstitutionName", "SpecificCharacterSet"])
    assert info.attrs == {"StudyDescription": (text,), "InstitutionName": (f"{text} 2",),
                          "SpecificCharacterSet": (charset,)}


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrH32.dcm", "chrI2.dcm", "chrX1.dcm", "chrX2.dcm", "chrGreek.dcm"])
def test_iso_2022_and_multi_byte_names_decode_like_pydicom(tmp_path, name):
    """Code extensions switch the character set inside one value (Japanese, Korean, Chinese)."""
    ds = pydicom.dcmread(get_charset_files(name)[0])
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(tmp_path / name, enforce_file_format=True)
    expected = str(pydicom.dcmread(tmp_path / name).PatientName)
    assert inspect(tmp_path / name, attributes=["PatientName"]).attrs["PatientName"] == (expected,)


def test_multi_valued_and_empty_and_missing_attributes(tmp_path):
    path = tmp_path / "a.dcm"
    write_tagged(path, "CT", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], StationName="")
    attrs = inspect(path, attributes=["ImageType", "StationName", "BodyPartExamined", "Rows"]).attrs
    assert attrs["ImageType"] == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert attrs["StationName"] == ("",)  # present, empty
    assert "BodyPartExamined" not in attrs  # a missing attribute is no key
    assert attrs["Rows"] == ("128",)  # a binary number (US), as text


def test_patient_id_accession_number_and_modality_are_read_on_every_walk(tmp_path):
    path = tmp_path / "a.dcm"
    write_tagged(path, "MG", "ISO_IR 100", PatientID="Pät-42", AccessionNumber="ACC7")
    info = inspect(path)
    assert (info.patient_id, info.accession_number, info.modality, info.attrs) == ("Pät-42", "ACC7", "MG", {})
    write_instance(tmp_path / "b.dcm")
    assert inspect(tmp_path / "b.dcm").accession_number == ""  # CT_small has none


def test_routing_asks_for_the_uids_too(tmp_path):
    sop = write_instance(tmp_path / "a.dcm", MR_SMALL)
    assert inspect(tmp_path / "a.dcm", attributes=["SOPInstanceUID", "SOPClassUID"]).attrs == {
        "SOPInstanceUID": (sop,), "SOPClassUID": ("1.2.840.10008.5.1.4.1.1.4",)}


def test_the_walk_never_reads_pixel_data(tmp_path, monkeypatch):
    """4 MiB of pixel data: the walk reads the header windows on both sides of it, and skips it by its length."""
    ds = fresh(CT_SMALL)
    ds.Rows = ds.Columns = 1448
    ds.PixelData = os.urandom(1448 * 1448 * 2)
    ds.StationName = "CT-7"
    ds.add_new(0x7FE10010, "LO", "a private element after the pixel data: the walk goes on past them")
    ds.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    size = (tmp_path / "big.dcm").stat().st_size
    read: list[tuple[int, int]] = []
    real = os.pread

    def counting(fd, n, pos):
        data = real(fd, n, pos)
        read.append((pos, len(data)))
        return data

    monkeypatch.setattr(dicomfile.os, "pread", counting)
    monkeypatch.setattr(dicomfile, "file_digest", lambda path: "")  # the sha256 reads the whole file, apart
    info = inspect(tmp_path / "big.dcm", attributes=["StationName", "Modality", "BodyPartExamined"])
    assert info.attrs["StationName"] == (ds.StationName,)
    assert sum(n for _, n in read) < 3 * dicomfile._Reader.WINDOW < size / 10, read


def test_bulk_data_and_unknown_keywords_are_refused():
    with pytest.raises(ValueError, match="bulk data or a sequence"):
        inspect(CT_SMALL, attributes=["PixelData"])
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        inspect(CT_SMALL, attributes=["Modalty"])


def test_a_deflated_file_gives_the_same_attributes(tmp_path):
    """A deflated data set: pydicom inflates and parses it (the walk cannot), with the same result."""
    path = tmp_path / "a.dcm"
    write_tagged(path, "MR", "ISO_IR 100", StudyDescription="Gehirn für Kinder")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "dfl.dcm", enforce_file_format=True)
    keys = ["StudyDescription", "Modality", "Rows"]
    assert inspect(tmp_path / "dfl.dcm", attributes=keys).attrs == inspect(path, attributes=keys).attrs


def test_a_value_over_the_cap_is_not_read(tmp_path):
    path = tmp_path / "a.dcm"
    write_tagged(path, "CT", StudyComments="x" * (dicomfile._MAX_TEXT_BYTES + 2))
    assert "StudyComments" not in inspect(path, attributes=["StudyComments"]).attrs


def test_an_unknown_character_set_falls_back_without_failing(tmp_path):
    path = tmp_path / "a.dcm"
    write_tagged(path, "CT", "ISO_IR 100", StudyDescription="Schädel")
    data = path.read_bytes().replace(b"ISO_IR 100", b"ISO_IR 999")
    Path(path).write_bytes(data)
    assert inspect(path, attributes=["StudyDescription"]).attrs["StudyDescription"] == ("Schädel",)
