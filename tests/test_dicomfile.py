"""Validation: real pydicom samples, generated files, truncations, junk and DICOMDIR."""

import dataclasses
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from relaypacsd.dicomfile import DicomDirFound, TruncatedDicom, ZeroTail, inspect, is_dicomdir, sop_instance_uid
from relaypacsd.errors import InvalidDicomError
from tests.dicomfactory import CT_SMALL, DICOMDIR, MR_SMALL, MR_TRUNCATED, NO_META, fresh, write_instance

GOOD = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm", "image_dfl.dcm", "reportsi.dcm"]


@pytest.mark.parametrize("name", GOOD)
def test_real_samples_are_accepted(name):
    info = inspect(get_testdata_file(name))
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    assert info.sop_instance_uid == ds.SOPInstanceUID and info.study_instance_uid == ds.StudyInstanceUID


def test_generated_instance(tmp_path):
    sop = write_instance(tmp_path / "a.dcm", MR_SMALL)
    info = inspect(tmp_path / "a.dcm")
    assert info.sop_instance_uid == sop and info.size == (tmp_path / "a.dcm").stat().st_size


@pytest.mark.parametrize("template", [CT_SMALL, MR_SMALL, Path(get_testdata_file("JPEG2000.dcm"))])
def test_every_truncation_is_caught(tmp_path, template):
    data = template.read_bytes()
    target = tmp_path / "cut.dcm"
    accepted = []
    for cut in range(0, len(data), max(1, len(data) // 150)):
        target.write_bytes(data[:cut])
        try:
            inspect(target)
            accepted.append(cut)
        except InvalidDicomError:
            pass
    assert accepted == []


def test_shipped_truncated_sample(tmp_path):
    with pytest.raises(InvalidDicomError, match="truncated"):
        inspect(MR_TRUNCATED)


@pytest.mark.parametrize("content, words", [
    (b"", "empty file"),
    (b"hello world" * 20, "not a DICOM file"),
    (b"\0" * 128 + b"DICM" + b"\x02\x00", "not readable as DICOM|no data elements|truncated"),
])
def test_junk(tmp_path, content, words):
    p = tmp_path / "junk.dcm"
    p.write_bytes(content)
    with pytest.raises(InvalidDicomError, match=words):
        inspect(p)


def test_dataset_without_part10_header_is_refused_with_the_fix():
    with pytest.raises(InvalidDicomError, match="without the Part-10 file header.*dcmconv"):
        inspect(NO_META)


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_uid(tmp_path, keyword):
    ds = fresh(CT_SMALL)
    delattr(ds, keyword)
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=False)
    with pytest.raises(InvalidDicomError, match=keyword) as err:
        inspect(tmp_path / "x.dcm")
    assert not isinstance(err.value, TruncatedDicom)  # elements follow where it belongs: truly missing


@pytest.mark.parametrize("cut_before, words", [(0x00080000, "no data set after the file meta header"),
                                               (0x0020000D, "StudyInstanceUID is missing.*may be cut off")])
def test_a_file_cut_at_an_element_boundary_counts_as_truncated(tmp_path, cut_before, words):
    """A writer paused between two elements leaves a well-formed prefix: it must get the growing grace."""
    ds = fresh(CT_SMALL)
    for tag in [t for t in ds.keys() if t >= cut_before]:
        del ds[tag]
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    with pytest.raises(TruncatedDicom, match=words):
        inspect(tmp_path / "x.dcm")


def test_dicomdir_is_never_an_instance():
    assert is_dicomdir(DICOMDIR)
    with pytest.raises(DicomDirFound, match="DICOMDIR"):
        inspect(DICOMDIR)


def test_elements_with_32_bit_length_vrs_sv_uv_are_walked_right(tmp_path):
    """SV/UV have a 4-byte length like OB; a walk that did not know it called valid files truncated."""
    ds = fresh(CT_SMALL)
    ds.add_new(0x00720082, "SV", [-5, 7])  # Selector SV Value
    ds.add_new(0x00720083, "UV", [2**40])  # Selector UV Value (not a real pairing, but legal encoding)
    ds.save_as(tmp_path / "sv.dcm", enforce_file_format=True)
    assert inspect(tmp_path / "sv.dcm").sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # one sample says explicit and is implicit
def test_uids_read_by_the_walk_match_pydicom_for_every_sample_pydicom_ships():
    """The walk reads the four UIDs itself; on every accepted sample they must equal what pydicom decodes."""
    accepted = 0
    # the folder itself: get_testdata_files() would try to download pydicom's extra data set first
    for name in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*")):
        if not name.is_file():
            continue
        try:
            info = inspect(name)
        except InvalidDicomError:
            continue
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        assert (info.sop_class_uid, info.sop_instance_uid, info.study_instance_uid, info.series_instance_uid) == (
            ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID), name
        assert info.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID, name
        # The history's identifying attributes, read on the same walk (PatientID may be any text)
        assert (info.patient_id, info.accession_number, info.modality) == tuple(
            str(ds.get(k, "") or "").strip("\0 ") for k in ("PatientID", "AccessionNumber", "Modality")), name
        accepted += 1
    assert accepted >= 50  # pydicom 3.0 ships 56 complete Part-10 instances with all four UIDs


def test_a_preallocated_file_not_yet_filled_is_truncated(tmp_path):
    """SMB clients and rsync --preallocate set the full size first, then fill it: zeros after the last
    element must not pass as a complete file. An image is caught by its missing pixel data; a report (SR,
    PDF) has no such element, so the order of the tags has to tell."""
    ds = fresh(CT_SMALL)
    for tag in [t for t in ds.keys() if t.group in (0x0028, 0x7FE0)]:
        del ds[tag]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    data = (tmp_path / "report.dcm").read_bytes()
    inspect(tmp_path / "report.dcm")  # complete as written
    (tmp_path / "x.dcm").write_bytes(data + bytes(4096))  # the rest of the preallocated size, still zeros
    with pytest.raises(ZeroTail, match="zeros where data should be.*or padded with zeros") as err:
        inspect(tmp_path / "x.dcm")
    assert err.value.data_end == len(data) and err.value.padding  # what `truncate -s` needs
    (tmp_path / "y.dcm").write_bytes(data + bytes(4096) + b"data written out of order")
    with pytest.raises(ZeroTail) as err:
        inspect(tmp_path / "y.dcm")
    assert not err.value.padding and "padded" not in str(err.value)  # cutting there would lose data


def test_elements_out_of_order_or_repeated_still_pass(tmp_path):
    """Some anonymizers append an element after the pixel data or repeat one: PACS read such files."""
    write_instance(tmp_path / "full.dcm")
    data = (tmp_path / "full.dcm").read_bytes()
    appended = b"\x12\x00\x62\x00CS\x04\x00YES "  # (0012,0062) PatientIdentityRemoved, after (7FE0,0010)
    (tmp_path / "x.dcm").write_bytes(data + appended)
    assert inspect(tmp_path / "x.dcm").size == len(data) + len(appended)


def _spectroscopy(path, with_data=True):
    """An MR Spectroscopy instance: Rows and Columns, its data in SpectroscopyData, no pixel data."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows = ds.Columns = 1
    if with_data:
        ds.add_new(0x56000020, "OF", struct.pack("<8f", *range(8)))
    ds.save_as(path, enforce_file_format=True)
    return path


def test_mr_spectroscopy_carries_spectroscopy_data_not_pixel_data(tmp_path):
    """Rows and Columns do not make an image: MR Spectroscopy has SpectroscopyData (5600,0020) instead."""
    info = inspect(_spectroscopy(tmp_path / "mrs.dcm"))
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.2"
    with pytest.raises(TruncatedDicom, match="SpectroscopyData"):
        inspect(_spectroscopy(tmp_path / "cut.dcm", with_data=False))


def test_an_image_class_without_pixel_data_still_counts_as_truncated(tmp_path):
    """The check stays for the classes that carry pixel data, and Rows still decides for a private class."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    with pytest.raises(TruncatedDicom, match="pixel data"):
        inspect(tmp_path / "ct.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.1"  # private
    ds.save_as(tmp_path / "private.dcm", enforce_file_format=True)
    with pytest.raises(TruncatedDicom, match="pixel data"):
        inspect(tmp_path / "private.dcm")


def _without(tmp_path, template, drop, sop_class=None, name="x.dcm"):
    ds = fresh(template)
    for tag in [t for t in ds.keys() if t in drop or t.group in drop]:
        del ds[tag]
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(tmp_path / name, enforce_file_format=True)
    return tmp_path / name


@pytest.mark.parametrize("drop", [{0x7FE00010}, {0x0028, 0x7FE0}])
def test_an_image_class_without_pixel_data_is_refused_even_without_rows(tmp_path, drop):
    """The SOP class decides: a CT cut off before its image module is as incomplete as one cut before its pixels."""
    with pytest.raises(TruncatedDicom, match="an image without pixel data"):
        inspect(_without(tmp_path, CT_SMALL, drop))


def test_rt_dose_needs_pixel_data_only_with_a_dose_grid(tmp_path):
    """RT Dose is an image when it holds a dose grid (its Image Pixel module); a DVH-only dose has none."""
    rtdose = Path(get_testdata_file("rtdose.dcm"))
    assert inspect(rtdose).sop_class_uid == "1.2.840.10008.5.1.4.1.1.481.2"
    with pytest.raises(TruncatedDicom, match="an image without pixel data"):
        inspect(_without(tmp_path, rtdose, {0x7FE00010}))
    inspect(_without(tmp_path, rtdose, {0x0028, 0x7FE0}, name="dvh.dcm"))


def test_a_private_class_is_an_image_by_its_image_pixel_module_not_by_rows(tmp_path):
    private = "1.2.826.0.1.3680043.9.9999.1"  # a class pydicom does not know
    with pytest.raises(TruncatedDicom, match="an image without pixel data"):
        inspect(_without(tmp_path, CT_SMALL, {0x7FE00010}, private))
    kept = {0x00280010, 0x00280011}  # Rows and Columns alone, as in a vendor's spectroscopy
    ds = pydicom.dcmread(_without(tmp_path, CT_SMALL, {0x7FE0}, private, name="rows.dcm"))
    for tag in [t for t in ds.keys() if t.group == 0x0028 and t not in kept]:
        del ds[tag]
    ds.save_as(tmp_path / "rows.dcm", enforce_file_format=True)
    inspect(tmp_path / "rows.dcm")


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.481.5",
                                       "1.2.840.10008.5.1.4.1.1.66"])  # Basic Text SR, RT Plan, Raw Data
def test_classes_without_bulk_data_pass_even_with_rows(tmp_path, sop_class):
    """Rows left from an image module (a converter's leftover) does not make a report or a plan an image."""
    inspect(_without(tmp_path, CT_SMALL, {0x7FE0}, sop_class))


def test_an_encapsulated_pdf_needs_its_document(tmp_path):
    pdf = "1.2.840.10008.5.1.4.1.1.104.1"
    ds = pydicom.dcmread(_without(tmp_path, CT_SMALL, {0x0028, 0x7FE0}, pdf))
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.save_as(tmp_path / "cut.pdf.dcm", enforce_file_format=True)
    with pytest.raises(TruncatedDicom, match="encapsulated document without EncapsulatedDocument"):
        inspect(tmp_path / "cut.pdf.dcm")
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.save_as(tmp_path / "doc.pdf.dcm", enforce_file_format=True)
    inspect(tmp_path / "doc.pdf.dcm")


def test_a_meta_header_naming_another_instance_is_forwarded_by_the_data_sets_uid():
    """pydicom's rtplan.dcm: meta header and data set name two UIDs; Orthanc files it by the data set's."""
    path = get_testdata_file("rtplan.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    info = inspect(path)
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.meta_sop_instance_uid == ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    assert sop_instance_uid(path) == ds.SOPInstanceUID  # start-up's evidence goes by the data set's UID too
    with pytest.raises(InvalidDicomError, match="MediaStorageSOPInstanceUID .* differs .*strict_meta_uid"):
        inspect(path, strict_meta_uid=True)
    assert inspect(get_testdata_file("CT_small.dcm"), strict_meta_uid=True).meta_sop_instance_uid == ""


def test_a_preamble_starting_like_a_zip_is_still_dicom(tmp_path):
    """The 128-byte preamble is free (PS3.10 7.1): 'DICM' at byte 128 decides, not PK at byte 0."""
    from relaypacsd.archive import is_zip

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.preamble = b"PK\x03\x04" + b"\0" * 124
    ds.save_as(tmp_path / "polyglot.dcm", enforce_file_format=True)
    assert (tmp_path / "polyglot.dcm").read_bytes()[:4] == b"PK\x03\x04"
    assert not is_zip(tmp_path / "polyglot.dcm")
    assert inspect(tmp_path / "polyglot.dcm").sop_instance_uid == ds.SOPInstanceUID


def test_the_walk_reads_patient_id_accession_and_modality_for_the_history(tmp_path):
    """Read on the validation's walk, never PatientName; a UTF-8 PatientID stays readable, an absent one is ''."""
    ds = fresh(CT_SMALL)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.AccessionNumber, ds.Modality = "PAT-Ä1", "ACC42", "CT"
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    info = inspect(tmp_path / "a.dcm")
    assert (info.patient_id, info.accession_number, info.modality) == ("PAT-Ä1", "ACC42", "CT")
    assert not [f.name for f in dataclasses.fields(info) if "name" in f.name.lower()]
    del ds.PatientID, ds.AccessionNumber
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    info = inspect(tmp_path / "b.dcm")
    assert (info.patient_id, info.accession_number, info.modality) == ("", "", "CT")


def test_a_small_file_is_read_once_and_hashed_from_those_bytes(tmp_path, monkeypatch):
    """Validation is most of the daemon's CPU per file: a small instance is read with one pread, and its digest is
    of the bytes walked, not of a second read."""
    import hashlib
    import os as real_os

    import relaypacsd.dicomfile as dicomfile

    path = tmp_path / "ct.dcm"
    write_instance(path)
    reads = []
    real_pread = real_os.pread
    monkeypatch.setattr(dicomfile.os, "pread", lambda fd, n, pos: reads.append((n, pos)) or real_pread(fd, n, pos))
    monkeypatch.setattr(dicomfile, "file_digest", lambda p: pytest.fail("the file was read a second time"))
    monkeypatch.setattr(pydicom.filereader, "read_file_meta_info", lambda p: pytest.fail("pydicom read it again"))
    info = inspect(path)
    assert reads == [(path.stat().st_size, 0)]
    assert info.digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_larger_than_one_read_is_walked_in_windows_and_hashed_whole(tmp_path):
    """Past WHOLE bytes the walk reads windows and the digest is a sequential read of the whole file."""
    import hashlib

    from relaypacsd.dicomfile import _Reader

    ds = fresh()
    ds.Rows, ds.Columns = 1024, 1024
    ds.PixelData = bytes(range(256)) * (1024 * 1024 * 2 // 256)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size > _Reader.WHOLE
    info = inspect(path)
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.digest == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", GOOD + ["rtplan.dcm", "ExplVR_BigEnd.dcm", "rtdose.dcm"])
def test_the_meta_header_read_by_hand_says_what_pydicom_says(name):
    """The plain file meta is parsed without pydicom; where it is parsed, the three UIDs are pydicom's."""
    from relaypacsd.dicomfile import _plain_meta, _pydicom_meta, _Reader

    path = Path(get_testdata_file(name))
    with _Reader(str(path)) as reader:
        plain = _plain_meta(reader)
    assert plain is not None, "a plain meta header fell back to pydicom"
    assert plain[0] == _pydicom_meta(path)


def test_an_implicit_vr_meta_header_falls_back_to_pydicom_and_still_passes(tmp_path):
    """A file meta written implicit VR (wrong, but some old writers do) is not plain: pydicom reads it."""
    from relaypacsd.dicomfile import _plain_meta, _Reader

    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    meta = pydicom.filebase.DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(meta, ds.file_meta)
    start = 144 + struct.unpack_from("<I", raw, 140)[0]  # after the meta, by its group length
    path = tmp_path / "implicit-meta.dcm"
    path.write_bytes(raw[:132] + meta.getvalue() + raw[start:])
    with _Reader(str(path)) as reader:
        assert _plain_meta(reader) is None
    assert inspect(path).sop_instance_uid == ds.SOPInstanceUID


def test_a_meta_element_with_a_damaged_vr_is_refused_as_damaged(tmp_path):
    """pydicom reads the meta header, then fails when the damaged element is decoded: that too is a refusal
    (before, the error escaped inspect and the file stayed in sending/, validated again at every sweep)."""
    raw = bytearray(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    at = raw.index(b"\x02\x00\x03\x00UI")  # (0002,0003) MediaStorageSOPInstanceUID, explicit VR
    raw[at + 4:at + 6] = b"Ud"
    path = tmp_path / "damaged-meta.dcm"
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidDicomError, match="not readable as DICOM .*Unknown Value Representation"):
        inspect(path)


def test_a_deflated_file_cut_off_is_truncated(tmp_path):
    """zlib's errors escaped inspect before: the file stayed in sending/, validated again at every sweep."""
    ds = fresh()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "dfl.dcm", enforce_file_format=True)
    raw = (tmp_path / "dfl.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[:len(raw) - 2000])
    with pytest.raises(TruncatedDicom, match="deflated data set ends early"):
        inspect(tmp_path / "cut.dcm")


def test_a_zip_is_told_apart_by_the_same_read(tmp_path):
    """A zip dropped into the inbox is recognised by inspect itself (validation unpacks it)."""
    import zipfile

    from relaypacsd.dicomfile import ArchiveFound

    with zipfile.ZipFile(tmp_path / "study.zip", "w") as archive:
        archive.write(get_testdata_file("CT_small.dcm"), "CT_small.dcm")
    with pytest.raises(ArchiveFound, match="zip archive"):
        inspect(tmp_path / "study.zip")
