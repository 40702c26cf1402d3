"""DICOM JSON value readers, shared by the STOW answer's reconciliation, the probe and `query`."""

from relaypacsd import dicomjson

DS = {"00080018": {"vr": "UI", "Value": ["1.2.3", "1.2.4"]}, "00100010": {"vr": "PN"},
      "00081030": {"vr": "LO", "Value": "not a list"}, "00080050": "not an element"}


def test_values_are_the_value_list_or_nothing():
    assert dicomjson.values(DS, "00080018") == ["1.2.3", "1.2.4"]
    assert [dicomjson.values(DS, t) for t in ("00100010", "00081030", "00080050", "7FE00010")] == [[], [], [], []]


def test_first_is_the_first_value_or_none():
    assert dicomjson.first(DS, "00080018") == "1.2.3"
    assert [dicomjson.first(DS, t) for t in ("00100010", "00081030", "00080050", "7FE00010")] == [None] * 4
