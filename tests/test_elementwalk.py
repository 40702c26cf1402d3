"""The element walk in C (relaypacsd/elementwalk.c) gives the same answer as the walk in Python, on every sample
pydicom ships and on thousands of damaged copies of them: the same DicomInfo, or the same refusal word for word."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from relaypacsd import dicomfile
from relaypacsd.dicomfile import inspect
from relaypacsd.errors import InvalidDicomError
from tests.dicomfactory import fresh

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about odd samples it reads

SAMPLES = sorted(p for p in (Path(pydicom.data.__file__).parent / "test_files").rglob("*")
                 if p.is_file() and p.stat().st_size <= dicomfile._Reader.WHOLE)
# Keywords of the routing walk: values of several VRs are read too
ROUTING = ("Modality", "ImageType", "Rows", "StationName", "BodyPartExamined", "InstitutionName")


def test_the_c_walk_is_built_in_ci():
    """CI builds it (gcc is a bootstrap package): a missing C walk would pass every other test, slowly."""
    if os.environ.get("CI") == "true" or dicomfile._elementwalk is not None:
        assert dicomfile._elementwalk is not None, "relaypacsd/_elementwalk was not built: is gcc installed?"


def _outcome(path: Path, monkeypatch: pytest.MonkeyPatch, c: bool) -> object:
    with monkeypatch.context() as m:
        if not c:
            m.setattr(dicomfile, "_elementwalk", None)
        try:
            return inspect(path, attributes=ROUTING)
        except InvalidDicomError as exc:
            return type(exc).__name__, str(exc)


def _same(path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    in_c, in_python = _outcome(path, monkeypatch, True), _outcome(path, monkeypatch, False)
    assert in_c == in_python, path
    return in_c


def _damaged(data: bytes, rng: random.Random) -> list[bytes]:
    """Copies cut at several places (element boundaries among them), zero-filled tails, and flipped bytes."""
    n = len(data)
    cuts = {132, 133, 140, n - 1, n - 2, n - 8} | {rng.randrange(132, n) for _ in range(12)}
    out = [data[:c] for c in sorted(cuts) if 0 < c < n]
    out += [data[:c] + bytes(n - c) for c in sorted(rng.randrange(140, n) for _ in range(4))]
    for _ in range(12):
        flipped = bytearray(data)
        for _ in range(rng.choice((1, 3))):
            flipped[rng.randrange(132, n)] = rng.randrange(256)
        out.append(bytes(flipped))
    return out


def test_c_and_python_walks_agree_on_every_sample_and_its_damaged_copies(tmp_path, monkeypatch):
    rng = random.Random(15)
    accepted = refused = 0
    for sample in SAMPLES:
        data = sample.read_bytes()
        if len(data) < 200 or data[128:132] != b"DICM":
            continue
        for i, copy in enumerate([data, *_damaged(data, rng)]):
            path = tmp_path / f"{sample.name}.{i}"
            path.write_bytes(copy)
            result = _same(path, monkeypatch)
            if isinstance(result, dicomfile.DicomInfo):
                accepted += 1
            else:
                refused += 1
            path.unlink()
    assert accepted > 100 and refused > 1000, (accepted, refused)


def _nested(depth: int) -> Dataset:
    ds = fresh()
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = inner.ReferencedImageSequence
    return ds


@pytest.mark.parametrize("depth", [3, 200])
@pytest.mark.parametrize("undefined", [True, False])
def test_nested_sequences_deeper_than_the_c_walk_goes_are_walked_in_python(tmp_path, monkeypatch, depth, undefined):
    ds = _nested(depth)
    path = tmp_path / "nested.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    if undefined:  # pydicom writes sequences with undefined length when asked by is_undefined_length
        ds = pydicom.dcmread(path)
        _undefine(ds)
        ds.save_as(path, enforce_file_format=True)
    assert isinstance(_same(path, monkeypatch), dicomfile.DicomInfo)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])  # cut inside the innermost items
    assert _same(path, monkeypatch)[0] == "TruncatedDicom"


def _undefine(ds: Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefine(item)
