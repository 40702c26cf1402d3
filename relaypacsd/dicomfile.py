"""Decide whether a file is a complete DICOM Part-10 instance and read the UIDs delivery needs (and, on the same
walk, the top-level attributes routing asks for)."""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.charset
import pydicom.datadict
import pydicom.multival
import pydicom.valuerep
from pydicom._uid_dict import UID_dictionary
from pydicom.errors import InvalidDicomError as _PydicomInvalid

from relaypacsd.errors import InvalidDicomError

try:  # the walk in C (relaypacsd/elementwalk.c); without a compiler at install, the same walk in Python below
    from relaypacsd import _elementwalk
except ImportError:
    _elementwalk = None
C_WALK = _elementwalk is not None  # said once at start-up when False: validation then costs more CPU

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_REQUIRED_TAGS = {"SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018,
                  "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E}
_IMPLICIT_LE = "1.2.840.10008.1.2"
# Values above this stay on disk during validation: pixel data is never loaded here.
_DEFER = 1024
_UNDEFINED = 0xFFFFFFFF


@dataclass  # not frozen: made for every file (see journal.DeliveryRow)
class DicomInfo:
    """What delivery needs to know about one valid instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size: int
    # The file meta's MediaStorageSOPInstanceUID where it names another instance than the data set (some
    # exporters rewrite one and not the other); '' when they agree. Delivery goes by the data set's UID.
    meta_sop_instance_uid: str = ""
    digest: str = ""  # sha256 of the whole file: tells a corrected file with a reused SOPInstanceUID from a copy
    # Read on every walk, decoded with the file's SpecificCharacterSet ('' when absent; values joined by '\\').
    patient_id: str = ""
    accession_number: str = ""
    modality: str = ""
    # The top-level attributes `inspect` was asked for (routing), by keyword: each one present in the data set
    # with its values decoded, one string per value (ImageType ORIGINAL\\PRIMARY: ('ORIGINAL', 'PRIMARY'); an
    # empty element: ('',)). An attribute the file lacks is not a key.
    attrs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class TruncatedDicom(InvalidDicomError):
    """The file ends before its data set does: cut off, or still being written."""


class ZeroTail(TruncatedDicom):
    """Zero bytes follow the data set: a file preallocated and still being filled, or plain padding."""

    def __init__(self, message: str, data_end: int, padding: bool):
        super().__init__(message)
        self.data_end = data_end  # where the zeros begin
        self.padding = padding  # nothing but zeros follow: cutting them off leaves the data set whole


class DicomDirFound(InvalidDicomError):
    """The file is a DICOMDIR (an index of a media set), which is never sent as an instance."""


class ArchiveFound(InvalidDicomError):
    """The file is a zip archive (a study exported as one), whose members are validated one by one instead."""


ZIP_MAGIC = b"PK\x03\x04"  # a zip's local file header


def is_dicomdir(path: str | os.PathLike[str]) -> bool:
    """True when the file's meta header says Media Storage Directory (DICOMDIR)."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS


def sop_instance_uid(path: str | os.PathLike[str]) -> str:
    """The data set's SOP Instance UID (the one a PACS files it under); '' when it has none."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.get("SOPInstanceUID", "")).strip("\0 ")
    except Exception:  # not readable as DICOM: it is no evidence of anything
        return ""


def inspect(path: str | os.PathLike[str], *, strict_meta_uid: bool = False,
            attributes: Iterable[str] = ()) -> DicomInfo:
    """Validate `path` as a complete Part-10 instance with the required UIDs; raise InvalidDicomError saying why.

    `strict_meta_uid` refuses a file whose meta header names another SOP instance than its data set.
    `attributes` are DICOM keywords of top-level attributes to read into `DicomInfo.attrs` on the same walk
    (pixel data is never read: the walk skips it by its length)."""
    wanted = _wanted(tuple(attributes))
    path = Path(path)
    with _Reader(str(path)) as reader:
        size = reader.size
        if size == 0:
            raise InvalidDicomError("empty file (0 bytes): the sender wrote nothing; send the image again from the "
                                    "modality")
        head = reader.buf[:132]
        if head[:4] == ZIP_MAGIC and head[128:132] != b"DICM":
            # The preamble is free for applications (PS3.10 7.1): a DICOM/zip polyglot is DICOM, by 'DICM'.
            raise ArchiveFound("a zip archive, not a DICOM file (dropped into inbox/, the daemon unpacks it and "
                               "forwards its members)")
        plain = _plain_meta(reader)
        if plain is None:  # anything unusual in the file meta: pydicom judges it, and says why
            meta, data_start = _pydicom_meta(path), None
        else:
            meta, data_start = plain
        if meta.get("MediaStorageSOPClassUID", "") == DICOMDIR_CLASS:
            raise DicomDirFound(
                "this is a DICOMDIR (the index of a CD/DVD/USB media set), not an image: it is never sent; "
                "the image files it lists are forwarded as files of their own")
        transfer_syntax = meta.get("TransferSyntaxUID", "").strip() or _IMPLICIT_LE
        top_level, uids, texts = _check_complete(reader, path, transfer_syntax, wanted, data_start)
        # sha256 of the bytes just walked when the whole file was read at once, else one sequential read
        digest = hashlib.sha256(reader.buf).hexdigest() if reader.whole else file_digest(path)
    values = {}
    for keyword, tag in _REQUIRED_TAGS.items():
        value = uids.get(tag, "")
        if not value:
            message = (f"required attribute {keyword} is missing or empty: the PACS cannot file this instance; "
                       "fix it at the modality or with a DICOM editor, then resend")
            if top_level and max(top_level) < tag:
                # The data set ends before where the attribute belongs: cut off at an element boundary while
                # being written, maybe. Truncated files get the daemon's grace before they fail.
                raise TruncatedDicom(f"{message} (the data set ends before it: the file may be cut off)")
            raise InvalidDicomError(message)
        values[keyword] = value
    _check_bulk_data(values["SOPClassUID"], top_level)
    media_sop = meta.get("MediaStorageSOPInstanceUID", "").strip("\0 ")
    mismatch = media_sop if media_sop and media_sop != values["SOPInstanceUID"] else ""
    if mismatch and strict_meta_uid:
        raise InvalidDicomError(
            f"file meta MediaStorageSOPInstanceUID ({media_sop}) differs from SOPInstanceUID "
            f"({values['SOPInstanceUID']}): the file was altered inconsistently; re-export it from the source "
            "(delivery.strict_meta_uid = true refuses such files)")
    return DicomInfo(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        size=size,
        meta_sop_instance_uid=mismatch,
        digest=digest,
        patient_id="\\".join(texts.get(_PATIENT_ID, ())),
        accession_number="\\".join(texts.get(_ACCESSION_NUMBER, ())),
        modality="\\".join(texts.get(_MODALITY, ())),
        attrs={keyword: texts[tag] for tag, keyword in wanted.keywords.items() if tag in texts},
    )


_META_UIDS = {0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID",
              0x00020010: "TransferSyntaxUID"}
_META_HEADER = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length: file meta is explicit VR little endian


def _plain_meta(reader: "_Reader") -> tuple[dict[str, str], int] | None:
    """The file meta's three UIDs and where the data set starts, read from the first window, when the meta is
    plain: 'DICM', then group 0002 elements with known VRs, all within the window, the three as UI values. None
    otherwise: pydicom judges the rest (it also reads implicit VR meta headers, and its errors say what is
    wrong)."""
    buf, size = reader.buf, reader.size
    if buf[128:132] != b"DICM":
        return None
    pos, found = 132, {}
    while pos + 8 <= size:
        if pos + 12 > len(buf):
            return None
        group, element, vr, length = _META_HEADER.unpack_from(buf, pos)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            length = _LE_LONG.unpack_from(buf, pos + 8)[0]
            pos += 12
        elif vr in _KNOWN_VRS:
            pos += 8
        else:
            return None
        end = pos + length
        if end > len(buf):
            return None  # beyond the window or the file (or undefined length): pydicom's to judge
        keyword = _META_UIDS.get((group << 16) | element)
        if keyword is not None:
            value = buf[pos:end].decode("latin-1").rstrip("\0 ")  # as pydicom reads UI: trailing padding cut
            if vr != b"UI" or "\\" in value:
                return None
            found[keyword] = value
        pos = end
    return found, pos


def _pydicom_meta(path: Path) -> dict[str, str]:
    """The file meta's three UIDs as pydicom reads them; InvalidDicomError saying why it cannot."""
    try:
        # pydicom judges the Part-10 envelope: preamble, 'DICM', the file meta group and its transfer syntax.
        meta = pydicom.filereader.read_file_meta_info(path)
        # Inside the try: pydicom decodes an element when it is read, and a damaged one fails only then.
        return {keyword: str(meta.get(keyword, "")) for keyword in _META_UIDS.values()}
    except _PydicomInvalid:
        raise InvalidDicomError(_no_part10_reason(path)) from None
    except Exception as exc:  # pydicom raises many kinds on damaged input; every one means 'damaged'
        raise _damaged(exc) from None


def _damaged(exc: Exception) -> InvalidDicomError:
    """What pydicom's failure on a damaged file is said as."""
    return InvalidDicomError(f"not readable as DICOM ({type(exc).__name__}: {exc}): the file is damaged; send it again")


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file, hex (one sequential read; ~30 us for a 39 KB CT)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


_PIXELS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009,  # Pixel Data, Float and Double Float Pixel Data
                     0x00287FE0))  # Pixel Data Provider URL: JPIP pixel data lives on a server (PS3.3 C.7.6.3)
# Type 1 elements of the Image Pixel module: where all are present, pixel data must follow. Rows alone is no
# sign of an image: MR Spectroscopy has Rows and Columns too.
_IMAGE_PIXEL_MODULE = frozenset((0x00280010, 0x00280100, 0x00280004))  # Rows, Bits Allocated, Photometric Interp.
_RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"  # pixel data only for grid-based doses (PS3.3 A.18.3): by the module
# Standard classes with pixel data: the image storage classes, and those whose name does not say "Image"
_PIXEL_CLASSES = frozenset(
    [uid for uid, entry in UID_dictionary.items() if entry[1] == "SOP Class" and "Image Storage" in entry[0]]
    + ["1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
       "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
       "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
       "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic OCT B-scan Volume Analysis
       "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map
       "1.2.840.10008.5.1.4.1.1.82.1"])  # Corneal Topography Map
_IMAGE = ("an image", "pixel data", _PIXELS)
_ENCAPSULATED = ("an encapsulated document", "EncapsulatedDocument (0042,0011)", frozenset((0x00420011,)))
# Classes whose bulk data is a Type 1 element other than pixel data: (what the file is, what it lacks, its tags)
_OTHER_BULK = {
    "1.2.840.10008.5.1.4.1.1.4.2": ("an MR spectroscopy", "SpectroscopyData (5600,0020)", frozenset((0x56000020,))),
    "1.2.840.10008.5.1.4.1.1.104.1": _ENCAPSULATED,  # PDF
    "1.2.840.10008.5.1.4.1.1.104.2": _ENCAPSULATED,  # CDA
    "1.2.840.10008.5.1.4.1.1.104.3": _ENCAPSULATED,  # STL
    "1.2.840.10008.5.1.4.1.1.104.4": _ENCAPSULATED,  # OBJ
    "1.2.840.10008.5.1.4.1.1.104.5": _ENCAPSULATED,  # MTL
}


def _bulk_data_of(sop_class: str, top_level: set[int]) -> tuple[str, str, frozenset[int]] | None:
    """(what the file is, its bulk data, the tags that may hold it) when the SOP class carries bulk data."""
    if sop_class in _OTHER_BULK:
        return _OTHER_BULK[sop_class]
    if sop_class in _PIXEL_CLASSES:
        return _IMAGE
    if (sop_class == _RT_DOSE or sop_class not in UID_dictionary) and _IMAGE_PIXEL_MODULE <= top_level:
        return _IMAGE  # RT Dose, and classes pydicom does not know (private, newer): by the module
    return None  # SR, RT Plan, presentation states, raw data ...: nothing to look for


def _check_bulk_data(sop_class: str, top_level: set[int]) -> None:
    """Raise TruncatedDicom when the bulk data the SOP class carries is missing: a file cut off at an element
    boundary before it is structurally complete, so only this catches it."""
    bulk = _bulk_data_of(sop_class, top_level)
    if bulk is not None and top_level.isdisjoint(bulk[2]):
        raise TruncatedDicom(f"{bulk[0]} without {bulk[1]}: the file is incomplete (cut off before it); "
                             "send it again")


# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2), as pydicom knows them
_LONG_VRS = frozenset(str(vr).encode() for vr in pydicom.valuerep.EXPLICIT_VR_LENGTH_32)
_KNOWN_VRS = frozenset(str(vr).encode() for vr in pydicom.valuerep.VR if len(str(vr)) == 2) - _LONG_VRS
# Any two capital letters read as a VR with a 16-bit length (a VR newer than pydicom's list is still walked
# right); one set lookup per element instead of two method calls.
_SHORT_VRS = frozenset(bytes((a, b)) for a in range(65, 91) for b in range(65, 91)) - _LONG_VRS
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_MAX_UID_BYTES = 256  # a UI value is at most 64 characters; anything far longer is not a UID
_MAX_TEXT_BYTES = 65536  # a longer attribute value is not read (a route never matches it)
_CHARSET, _PATIENT_ID, _ACCESSION_NUMBER, _MODALITY = 0x00080005, 0x00100020, 0x00080050, 0x00080060
# Read on every walk: the plain fields of DicomInfo, and the character set that decodes them
_ALWAYS = {_CHARSET: _MAX_TEXT_BYTES, _PATIENT_ID: _MAX_TEXT_BYTES, _ACCESSION_NUMBER: _MAX_TEXT_BYTES,
           _MODALITY: _MAX_TEXT_BYTES, **dict.fromkeys(_REQUIRED_TAGS.values(), _MAX_UID_BYTES)}
# VRs whose values cannot be matched as text: bulk data, sequences (routing refuses them as keys)
UNREADABLE_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UN"))
_CHARSET_VRS = frozenset(str(vr) for vr in pydicom.charset.CUSTOMIZABLE_CHARSET_VR)  # SH LO ST LT UC UT PN
_ONE_VALUE_VRS = frozenset(("ST", "LT", "UT", "UR"))  # a backslash is a character there, not a separator
_NUMBER_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q", "AT": "HH"}


@dataclass(frozen=True)
class _Wanted:
    """The tags one walk reads values of: tag -> the most bytes read, and the keywords asked for by tag."""

    caps: Mapping[int, int]
    keywords: Mapping[int, str]
    vrs: Mapping[int, str]  # the dictionary VR of each tag (implicit VR files carry none)


def attribute_tag(keyword: str) -> tuple[int, str]:
    """(tag, VR) of a top-level attribute's DICOM keyword; ValueError when it is no keyword pydicom knows."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or pydicom.datadict.repeater_has_keyword(keyword):
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    return tag, str(pydicom.datadict.dictionary_VR(tag)).split(" or ")[0]


@functools.lru_cache(maxsize=32)
def _wanted(attributes: tuple[str, ...]) -> _Wanted:
    """The tags a walk reads for `attributes` (keywords) besides the ones it always reads. Cached: the daemon
    asks for the same keywords for every file."""
    keywords: dict[int, str] = {}
    vrs = {_CHARSET: "CS", _PATIENT_ID: "LO", _ACCESSION_NUMBER: "SH", _MODALITY: "CS"}
    for keyword in attributes:
        tag, vr = attribute_tag(keyword)
        if vr in UNREADABLE_VRS:  # bulk data (pixel data above all) and sequences are never read here
            raise ValueError(f"{keyword} (VR {vr}) is bulk data or a sequence: only text and numbers are read")
        keywords[tag], vrs[tag] = keyword, vr
    caps = dict(_ALWAYS)
    for tag in keywords:
        caps.setdefault(tag, _MAX_TEXT_BYTES)
    return _Wanted(caps, keywords, vrs)


@functools.lru_cache(maxsize=64)
def _encodings(charset: bytes) -> tuple[str, ...]:
    """Python codecs for a raw SpecificCharacterSet value (cached: one site sends a handful of them)."""
    terms = [t.strip("\0 ") for t in charset.decode("latin-1").split("\\")] if charset else []
    if not terms or not any(terms):
        return (pydicom.charset.default_encoding,)
    try:
        return tuple(pydicom.charset.convert_encodings(terms))
    except Exception:  # an unknown term: the default repertoire, as pydicom falls back to
        return (pydicom.charset.default_encoding,)


def _decode_text(raw: bytes, encodings: tuple[str, ...]) -> str:
    """A text value in the file's character set; undecodable bytes become U+FFFD, never an error."""
    if b"\x1b" in raw:  # ISO 2022 escape sequences switch the character set inside the value
        try:
            return pydicom.charset.decode_bytes(raw, list(encodings), pydicom.charset.TEXT_VR_DELIMS)
        except Exception:
            pass
    try:
        return raw.decode(encodings[0], errors="replace")
    except LookupError:
        return raw.decode("latin-1")


def _values(vr: str, raw: bytes, encodings: tuple[str, ...], little: bool) -> tuple[str, ...]:
    """One element's values as text: numbers formatted, text decoded and split at backslashes, padding cut."""
    if vr in _NUMBER_VRS:
        code = _NUMBER_VRS[vr]
        each = struct.calcsize(code)
        numbers = struct.iter_unpack(("<" if little else ">") + code, raw[:len(raw) - len(raw) % each])
        if vr == "AT":
            return tuple(f"({g:04X},{e:04X})" for g, e in numbers)
        return tuple(str(n[0]) for n in numbers) or ("",)
    if vr in _CHARSET_VRS:
        text = _decode_text(raw, encodings)
        parts = [text] if vr in _ONE_VALUE_VRS or "\\" not in text else text.split("\\")
        # Leading spaces are part of a text value; a name's trailing empty components (Doe^John^^=) are not.
        pad = "\0 ^=" if vr == "PN" else "\0 "
        return tuple(p.rstrip(pad) for p in parts)
    parts = raw.decode("latin-1").split("\\")  # the default repertoire (ASCII); latin-1 never fails
    return tuple(p.strip("\0 ") for p in parts)


# VRs as a walk meets them (bytes) -> their names; UN and implicit VR files ("??") carry no VR of their own
_WRITTEN_VRS = {str(vr).encode(): str(vr) for vr in pydicom.valuerep.VR if len(str(vr)) == 2 and str(vr) != "UN"}


def _texts(raw: Mapping[int, tuple[bytes, bytes]], wanted: _Wanted, little: bool) -> dict[int, tuple[str, ...]]:
    """The wanted values a walk met (tag -> (VR as written, bytes)), decoded; the required UIDs only when asked
    for by keyword (inspect reads them apart). Runs for every file: a few microseconds."""
    charset = raw.get(_CHARSET)
    encodings = _encodings(charset[1] if charset else b"")
    keywords, vrs = wanted.keywords, wanted.vrs
    out = {}
    for tag, (written, value) in raw.items():
        if tag in _REQUIRED_VALUES and tag not in keywords:
            continue
        vr = _WRITTEN_VRS.get(written) or vrs.get(tag, "UN")  # without a VR of its own: the dictionary's
        if vr in _CHARSET_VRS or vr in _NUMBER_VRS:
            out[tag] = _values(vr, value, encodings, little)
        elif vr not in UNREADABLE_VRS:  # the default repertoire (ASCII) of CS, DA, UI, ...: the common case, inline
            text = value.decode("latin-1")
            out[tag] = (text.strip("\0 "),) if "\\" not in text else tuple(p.strip("\0 ") for p in text.split("\\"))
    return out


_REQUIRED_VALUES = frozenset(_REQUIRED_TAGS.values())


class _Truncated(Exception):
    pass


# What a walk says when it stops early: worded here once, for both walks
def _header_cut(pos: int) -> _Truncated:
    return _Truncated(f"the file ends inside an element header at byte {pos}")


def _needs(tag: int, end: int, size: int) -> _Truncated:
    return _Truncated(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {end} bytes but the file has {size}")


def _delimiter(tag: int, pos: int) -> _Truncated:
    return _Truncated(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}")


class _ZeroTail(_Truncated):
    def __init__(self, pos: int):
        super().__init__(f"zeros from byte {pos}")
        self.pos = pos


def _all_zero(reader: "_Reader", pos: int) -> bool:
    """True when every byte from `pos` to the end of the file is zero."""
    while pos < reader.size:
        chunk = os.pread(reader.fd, 1 << 20, pos)
        if not chunk or chunk.strip(b"\0"):
            return False
        pos += len(chunk)
    return True


def _check_complete(reader: "_Reader", path: Path, transfer_syntax: str, wanted: _Wanted, data_start: int | None
                    ) -> tuple[set[int], dict[int, str], dict[int, tuple[str, ...]]]:
    """Walk every element header and require the last element to end exactly at the end of the file.

    Returns the top-level tags seen, the required UIDs' values and the other wanted values decoded, all read
    on the way (the walk skips every value it does not want by its length). A pydicom Dataset parse
    is not used for this: it swallows an end-of-file inside the data set and, with large values deferred,
    never reads them, so a clean parse proves nothing about completeness; and building the Dataset cost
    more than half of the daemon's CPU per file, for four strings the walk passes over anyway.
    """
    if transfer_syntax == _DEFLATED:
        # the deflate stream is checked by zlib while pydicom inflates it; read the whole data set instead
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER)
        except zlib.error as exc:  # before, it escaped inspect: the file stayed in sending/, read at every sweep
            if "incomplete or truncated" in str(exc):
                raise TruncatedDicom("truncated: the deflated data set ends early (the file was cut off while "
                                     "being written or copied); send it again") from None
            raise InvalidDicomError(f"the deflated data set is damaged ({exc}); send it again") from None
        except Exception as exc:  # pydicom raises many kinds on damaged input; every one means 'damaged'
            raise _damaged(exc) from None
        found = {}
        for tag in _REQUIRED_TAGS.values():
            try:
                found[tag] = str(ds[tag].value).strip() if tag in ds else ""
            except Exception:  # a damaged element decodes lazily and may fail here
                found[tag] = ""
        return set(ds.keys()), found, _dataset_values(ds, wanted)
    explicit = transfer_syntax != _IMPLICIT_LE
    little = transfer_syntax != _BIG_ENDIAN
    size = reader.size
    seen: set[int] = set()
    raw: dict[int, tuple[bytes, bytes]] = {}
    try:
        start = _meta_end(reader) if data_start is None else data_start
        if start >= size:
            raise TruncatedDicom("no data set after the file meta header: the file is truncated or empty; "
                                 "send it again")
        walked = _walk_in_c(reader, start, explicit, little, wanted.caps) if reader.whole else None
        if walked is None:
            pos = _walk(reader, start, explicit, little, until=None, seen=seen, values=raw, wanted=wanted.caps)
        else:
            pos, seen, raw = walked
    except _ZeroTail as exc:
        padding = _all_zero(reader, exc.pos)
        raise ZeroTail(f"zeros where data should be, from byte {exc.pos} of {size} (still being written, "
                       f"preallocated and never filled{' or padded with zeros' if padding else ''})",
                       exc.pos, padding) from None
    except _Truncated as exc:
        raise TruncatedDicom(f"truncated: {exc} (the file was cut off while being written or copied); "
                             "send it again") from None
    if pos != size:
        raise TruncatedDicom(f"truncated or damaged: the data set ends at byte {pos} of {size}; send it again")
    # UI values are ASCII padded with NUL (PS3.5 6.2); latin-1 never fails, and junk then fails at the PACS by name
    uids = {tag: raw[tag][1].decode("latin-1").strip("\0 ") for tag in _REQUIRED_VALUES if tag in raw}
    return seen, uids, _texts(raw, wanted, little)


def _dataset_values(ds: pydicom.Dataset, wanted: _Wanted) -> dict[int, tuple[str, ...]]:
    """The same as `_texts` from a parsed data set (deflated files), decoded by pydicom."""
    out = {}
    for tag in wanted.caps:
        if (tag in _REQUIRED_VALUES and tag not in wanted.keywords) or tag not in ds:
            continue
        try:
            elem = ds[tag]
            if elem.VR in UNREADABLE_VRS:
                continue
            value = elem.value
        except Exception:  # a damaged element decodes lazily and may fail here: as if absent
            continue
        items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        out[tag] = tuple("" if v is None else str(v) for v in items) or ("",)
    return out


class _Reader:
    """An open file read in one pread when small (up to WHOLE), else through a 64 KiB window: one pread per
    window instead of a seek per element."""

    WINDOW = 65536
    WHOLE = 1 << 20  # most CT, MR and US instances: walked and hashed from memory, the file read once

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self.fd).st_size
            self.start, self.buf = 0, os.pread(self.fd, self.size if self.size <= self.WHOLE else self.WINDOW, 0)
        except BaseException:
            os.close(self.fd)
            raise
        self.whole = len(self.buf) == self.size  # False too when the file shrank since: the walk says where

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def view(self, pos: int, n: int) -> tuple[bytes, int]:
        """(buffer, offset) holding bytes pos..pos+n of the file."""
        if pos + n > self.size:
            raise _header_cut(pos)
        off = pos - self.start
        if off < 0 or off + n > len(self.buf):
            self.whole = False  # the buffer no longer holds the whole file
            self.start, self.buf = pos, os.pread(self.fd, max(self.WINDOW, n), pos)
            off = 0
            if len(self.buf) < n:  # the file shrank under us
                raise _header_cut(pos)
        return self.buf, off


_HEADERS = {(True, True): struct.Struct("<HH2sH"), (True, False): struct.Struct(">HH2sH"),
            (False, True): struct.Struct("<HHI"), (False, False): struct.Struct(">HHI")}
_ITEM_HEADERS = {True: struct.Struct("<I"), False: struct.Struct(">I")}  # the 32-bit length at byte 4
_LONGS = {True: struct.Struct("<I"), False: struct.Struct(">I")}  # the 32-bit length at byte 8, after the VR
_LE_HEADER = _HEADERS[False, True]
_LE_LONG = _LONGS[True]


def _meta_end(reader: _Reader) -> int:
    """Byte offset after the preamble, 'DICM' and the group 0002 elements (always explicit little endian)."""
    pos = 132
    while pos + 8 <= reader.size:
        buf, off = reader.view(pos, 8)
        if _LE_HEADER.unpack_from(buf, off)[0] != 0x0002:
            break
        pos = _walk(reader, pos, True, True, until=None, single=True)
    return pos


def _walk(reader: _Reader, pos: int, explicit: bool, little: bool, until: int | None, single: bool = False,
          seen: set[int] | None = None, values: dict[int, tuple[bytes, bytes]] | None = None,
          wanted: Mapping[int, int] | None = None) -> int:
    """Walk elements from `pos`; stop at EOF, or after the delimiter tag `until` (or after one element if
    `single`). Return the end offset; add the tags met at this level to `seen`, and (VR, value) of the
    `wanted` tags at this level (tag -> the most bytes read) to `values`."""
    # This loop runs for every element of every file (about 260 in a small CT): it is written for the
    # interpreter, every check that can be hoisted out of it is, and the header is unpacked in one call.
    header_s = _HEADERS[explicit, little]  # (group, element, VR, 16-bit length) or (group, element, 32-bit length)
    item_s, long_s = _ITEM_HEADERS[little], _LONGS[little]
    size = reader.size
    if wanted is None or values is None:
        wanted = {}
    buf, start = reader.buf, reader.start
    end_of_buf = start + len(buf)
    while True:
        if pos == size and until is None:
            return pos
        if pos + 12 > end_of_buf:  # the window check inline: a method call per element was a third of the walk
            buf, off = reader.view(pos, 8)
            start = reader.start
            end_of_buf = start + len(buf)
        off = pos - start
        if explicit:
            group, element, vr, length = header_s.unpack_from(buf, off)
            if group == 0xFFFE:  # item and delimiter tags are always implicit: 4-byte length
                length = item_s.unpack_from(buf, off + 4)[0]
        else:
            group, element, length = header_s.unpack_from(buf, off)
            vr = b"??"
        if group == 0xFFFE:
            tag = (group << 16) | element
            pos += 8
            if tag == until:
                return pos
            if tag == _ITEM:
                if length == _UNDEFINED:
                    pos = _walk(reader, pos, explicit, little, until=_ITEM_END)
                else:
                    pos = _skip(pos, length, size, tag)
                continue
            raise _delimiter(tag, pos)
        tag = (group << 16) | element
        if seen is not None:
            # A file preallocated at full size and not yet filled reads on as zeros: tag (0000,0000) after the
            # elements before it. Only that signature counts: tags merely out of order or repeated (some
            # anonymizers append elements) are read by every PACS and were always forwarded.
            if group == 0 and seen and max(seen) >= tag:
                raise _ZeroTail(pos)
            seen.add(tag)
        if vr in _SHORT_VRS:
            pos += 8
        elif explicit and vr in _LONG_VRS:
            if pos + 12 > end_of_buf:
                buf, off = reader.view(pos, 12)
                start = reader.start
                end_of_buf = start + len(buf)
            length = long_s.unpack_from(buf, off + 8)[0]
            pos += 12
        else:  # implicit VR, or an explicit file's element that carries none (read as implicit)
            if explicit:
                length = item_s.unpack_from(buf, off + 4)[0]
            vr = b"SQ" if length == _UNDEFINED else b"??"
            pos += 8
        if length == _UNDEFINED:
            # an undefined-length UN holds an implicit little-endian sequence
            pos = _walk(reader, pos, explicit and vr != b"UN", little or vr == b"UN", until=_SEQ_END)
        else:
            if tag in wanted and length <= wanted[tag]:
                if pos + length > end_of_buf:
                    buf, off = reader.view(pos, length)
                    start = reader.start
                    end_of_buf = start + len(buf)
                value_at = pos - start
                values[tag] = (vr, bytes(buf[value_at:value_at + length]))  # type: ignore[index]
            end = pos + length
            if end > size:
                raise _needs(tag, end, size)
            pos = end
        if single:
            return pos


# The statuses of elementwalk.c's walk
_C_OK, _C_HEADER_CUT, _C_DELIMITER, _C_NEEDS, _C_ZERO_TAIL, _C_TOO_DEEP = range(6)
_LONG_VR_NAMES = b"".join(sorted(_LONG_VRS))


def _walk_in_c(reader: _Reader, start: int, explicit: bool, little: bool, wanted: Mapping[int, int]
               ) -> tuple[int, set[int], dict[int, tuple[bytes, bytes]]] | None:
    """The top-level walk of a file held whole in memory, in C: (end, top-level tags, wanted values), or the
    same _Truncated as `_walk`. None when the C walk is not built, or the file nests sequences deeper than it
    goes: `_walk` judges it then."""
    if _elementwalk is None:
        return None
    caps = wanted if isinstance(wanted, dict) else dict(wanted)
    status, pos, seen, values, tag, end = _elementwalk.walk(reader.buf, start, explicit, little, caps, _LONG_VR_NAMES)
    if status == _C_OK:
        return pos, seen, values
    if status == _C_HEADER_CUT:
        raise _header_cut(pos)
    if status == _C_DELIMITER:
        raise _delimiter(tag, pos)
    if status == _C_NEEDS:
        raise _needs(tag, end, reader.size)
    if status == _C_ZERO_TAIL:
        raise _ZeroTail(pos)
    return None


def _skip(pos: int, length: int, size: int, tag: int) -> int:
    end = pos + length
    if end > size:
        raise _needs(tag, end, size)
    return end


def _no_part10_reason(path: Path) -> str:
    """Say why a file without the Part-10 preamble is refused, telling a bare data set from junk."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID"])
        bare = bool(str(ds.get("SOPInstanceUID", "")).strip()) and bool(str(ds.get("SOPClassUID", "")).strip())
    except Exception:
        bare = False
    if bare:
        return ("a DICOM data set without the Part-10 file header (128-byte preamble + 'DICM' + file meta): STOW-RS "
                "carries Part-10 files only; convert it (DCMTK: `dcmconv IN OUT`) and drop the result into inbox/")
    return "not a DICOM file (no 'DICM' marker at byte 128): only DICOM Part-10 files can be forwarded"
