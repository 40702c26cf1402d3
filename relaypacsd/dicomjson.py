"""Reading values out of DICOM JSON (PS3.18 F.2): QIDO-RS matches and STOW-RS answers; tolerant of junk."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def values(dataset: Mapping[str, Any], tag: str) -> list[Any]:
    """The element's "Value" list, or [] when the element is absent, empty or not DICOM JSON."""
    element = dataset.get(tag)
    found = element.get("Value") if isinstance(element, Mapping) else None
    return found if isinstance(found, list) else []


def first(dataset: Mapping[str, Any], tag: str) -> Any:
    """The element's first value, or None."""
    found = values(dataset, tag)
    return found[0] if found else None
