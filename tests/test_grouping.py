"""One request's files: the rule the daemon's workers and `relaypacsd send` share."""

from relaypacsd.dicomfile import DicomInfo
from relaypacsd.grouping import fill_batch


def _info(study: str, sop: str, size: int = 10) -> DicomInfo:
    return DicomInfo("1.2", sop, study, "1.3", "1.2.840.10008.1.2.1", size)


def test_its_study_first_then_others_to_fill_the_request():
    first, *rest = [_info("A", "1"), _info("B", "2"), _info("A", "3"), _info("B", "4")]
    assert [i.sop_instance_uid for i in fill_batch(first, rest, lambda i: i, 3, 10**6)] == ["1", "3", "2"]


def test_caps_a_uid_twice_and_held_files_stay_out():
    first, *rest = [_info("A", "1", 60), _info("A", "1"), _info("A", "2", 50), _info("A", "3"), _info("A", "4")]
    batch = fill_batch(first, rest, lambda i: i, 10, 80, usable=lambda i: i.sop_instance_uid != "4")
    assert [i.sop_instance_uid for i in batch] == ["1", "3"]  # same UID, too big, held: all left for later
