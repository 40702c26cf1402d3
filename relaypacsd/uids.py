"""DICOM UIDs (PS3.5 9.1): the well-formedness check, importable without pydicom (quick commands need it)."""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(text: str) -> bool:
    """True for a well-formed DICOM UID: digits and dots, at most 64 characters, no leading zeros."""
    return (len(text) <= 64 and bool(_UID_RE.match(text))
            and not any(len(c) > 1 and c.startswith("0") for c in text.split(".")))
