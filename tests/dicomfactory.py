"""Real DICOM test files: pydicom's shipped samples, re-identified with fresh UIDs, written as Part-10."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))
MR_TRUNCATED = Path(get_testdata_file("MR_truncated.dcm"))
DICOMDIR = Path(get_testdata_file("DICOMDIR"))
NO_META = Path(get_testdata_file("ExplVR_LitEndNoMeta.dcm"))


def fresh(template: Path = CT_SMALL, *, study_uid: str | None = None, series_uid: str | None = None) -> Dataset:
    """A copy of a real sample with new SOP (and, unless given, study and series) UIDs."""
    ds = pydicom.dcmread(template)
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    # Orthanc refuses a known series under a new study: new study means new series too.
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    return ds


def write_instance(path: Path, template: Path = CT_SMALL, **uids: str | None) -> str:
    """Write one fresh instance to `path`; return its SOPInstanceUID."""
    ds = fresh(template, **uids)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def write_study(folder: Path, count: int, template: Path = CT_SMALL, prefix: str = "img") -> tuple[str, list[str]]:
    """Write `count` instances of one new study into `folder`; return (study UID, SOP UIDs)."""
    study, series = generate_uid(), generate_uid()
    sops = [write_instance(folder / f"{prefix}{i:05d}.dcm", template, study_uid=study, series_uid=series)
            for i in range(count)]
    return study, sops


# SOP classes by modality for write_tagged: the sample's pixel data stays, the class and Modality change
MODALITY_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                    "MG": "1.2.840.10008.5.1.4.1.1.1.2", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
                    "US": "1.2.840.10008.5.1.4.1.1.6.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}


def write_tagged(path: Path, modality: str, charset: str = "ISO_IR 192", template: Path = CT_SMALL,
                 **attributes: str) -> str:
    """Write one fresh instance of `modality` (its SOP class too) whose text is encoded in `charset`, with the
    top-level `attributes` given by keyword (StudyDescription="Gehirn für Kinder"); return its SOPInstanceUID."""
    ds = fresh(template)
    ds.Modality = modality
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MODALITY_CLASSES[modality]
    ds.SpecificCharacterSet = charset
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)  # pydicom encodes the text in the data set's character set
    return str(ds.SOPInstanceUID)
