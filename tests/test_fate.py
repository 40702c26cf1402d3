"""relaypacsd.fate: every row of the fate table, decided without I/O."""

from __future__ import annotations

import pytest

from relaypacsd.archive import BadArchive
from relaypacsd.dicomfile import DicomDirFound, TruncatedDicom, ZeroTail
from relaypacsd.errors import InvalidDicomError
from relaypacsd.fate import (
    LIMITED_MAX_DELIVERIES,
    RETRY_NEXT_STEP,
    TRUNCATION_GRACE,
    FailReason,
    Fate,
    Verdict,
    file_fate,
    instance_fate,
    may_still_grow,
    owed,
    refusal,
    retention_over,
    too_old,
    truncation_grace,
)
from relaypacsd.outcomes import Outcome
from relaypacsd.routing import ROUTING_NEXT_STEP, Unrouted

MAX_AGE = 72 * 3600.0
YOUNG, OLD = 60.0, MAX_AGE + 1


@pytest.mark.parametrize("outcome, attempts, age, fate", [
    (Outcome.DELIVERED, 1, YOUNG, Fate(Verdict.DELIVERED, 1)),
    (Outcome.DUPLICATE, 2, YOUNG, Fate(Verdict.DELIVERED, 2)),
    (Outcome.DELIVERED, 5, OLD, Fate(Verdict.DELIVERED, 5)),  # a late confirmation still counts
    (Outcome.UID_CONFLICT, 1, YOUNG, Fate(Verdict.FAILED, 1, FailReason.UID_CONFLICT)),
    (Outcome.UID_CONFLICT, 1, OLD, Fate(Verdict.FAILED, 1, FailReason.UID_CONFLICT)),
    (Outcome.PERMANENT, 1, YOUNG, Fate(Verdict.FAILED, 1, FailReason.PERMANENT)),
    (Outcome.PERMANENT, 1, OLD, Fate(Verdict.FAILED, 1, FailReason.PERMANENT)),  # its own reason, not "too old"
    (Outcome.TRANSIENT, 1, OLD, Fate(Verdict.FAILED, 1, FailReason.TOO_OLD)),
    (Outcome.DESTINATION, 1, OLD, Fate(Verdict.FAILED, 1, FailReason.TOO_OLD)),
    (Outcome.LIMITED, LIMITED_MAX_DELIVERIES, OLD, Fate(Verdict.FAILED, LIMITED_MAX_DELIVERIES, FailReason.TOO_OLD)),
    (Outcome.LIMITED, LIMITED_MAX_DELIVERIES, YOUNG, Fate(Verdict.FAILED, LIMITED_MAX_DELIVERIES, FailReason.LIMITED)),
    (Outcome.LIMITED, LIMITED_MAX_DELIVERIES - 1, YOUNG, Fate(Verdict.WAIT, LIMITED_MAX_DELIVERIES - 1)),
    (Outcome.TRANSIENT, 40, YOUNG, Fate(Verdict.WAIT, 40)),  # transient never fails before max_age_hours
    (Outcome.SPLIT, 1, YOUNG, Fate(Verdict.WAIT, 1)),
    (Outcome.DESTINATION, 3, YOUNG, Fate(Verdict.WAIT, 2)),  # the PACS's setup: no attempt spent
])
def test_each_outcome_has_the_fate_the_readme_table_gives_it(outcome, attempts, age, fate):
    assert instance_fate(outcome, attempts, age, MAX_AGE) == fate


def test_too_old_means_strictly_older_than_max_age():
    assert not too_old(MAX_AGE, MAX_AGE)
    assert too_old(MAX_AGE + 0.001, MAX_AGE)


def test_delivered_and_failed_rows_are_settled_the_others_are_owed():
    assert [owed(s) for s in ("pending", "waiting", "delivered", "failed")] == [True, True, False, False]


@pytest.mark.parametrize("states, destinations, folder", [
    ({"a": "delivered", "b": "delivered"}, ["a", "b"], "sent"),
    ({"a": "delivered", "b": "failed"}, ["a", "b"], "failed"),
    ({"a": "delivered"}, ["a", "b"], None),  # b's verdict lost: never sent without a confirmation
    ({"a": "failed"}, ["a", "b"], "failed"),  # a failure decides even with a verdict lost
    ({"a": "delivered", "old": "failed"}, ["a"], "failed"),  # a PACS no longer active that failed it
    ({"a": "delivered", "old": "pending"}, ["a"], "sent"),  # only active PACS must confirm
    ({}, [], "sent"),
])
def test_a_file_goes_to_sent_only_when_every_active_pacs_confirmed_it(states, destinations, folder):
    assert file_fate(states, destinations) == folder


def test_a_truncated_file_waits_for_the_grace_of_at_least_five_settle_times():
    assert truncation_grace(0.5) == TRUNCATION_GRACE
    assert truncation_grace(4.0) == 20.0
    cut = TruncatedDicom("cut")
    assert may_still_grow(cut, TRUNCATION_GRACE - 1, TRUNCATION_GRACE)
    assert not may_still_grow(cut, TRUNCATION_GRACE, TRUNCATION_GRACE)
    assert may_still_grow(ZeroTail("zeros", 100, True), 0.0, TRUNCATION_GRACE)
    assert not may_still_grow(InvalidDicomError("junk"), 0.0, TRUNCATION_GRACE)  # junk never grows into DICOM


@pytest.mark.parametrize("exc, stage, next_step", [
    (InvalidDicomError("junk"), "validation", RETRY_NEXT_STEP),
    (TruncatedDicom("cut"), "validation", RETRY_NEXT_STEP),
    (ZeroTail("zeros", 100, padding=False), "validation", RETRY_NEXT_STEP),
    (DicomDirFound("index"), "dicomdir", RETRY_NEXT_STEP),
    (BadArchive("traversal"), "archive", "fix the archive, or unzip it into inbox/ yourself"),
    (Unrouted("no route matches this file"), "routing", ROUTING_NEXT_STEP),  # #11: a retry routes it again
])
def test_each_refusal_names_its_stage_and_next_step(exc, stage, next_step):
    assert refusal(exc) == (stage, next_step)


def test_a_zero_padded_file_is_told_how_to_cut_the_padding():
    stage, next_step = refusal(ZeroTail("zeros", 9630, padding=True))
    assert stage == "validation"
    assert "truncate -s 9630 FILE" in next_step and "relaypacsd retry FILE" in next_step


def test_sent_files_go_after_the_retention_days_and_never_when_it_is_zero():
    day = 86400.0
    assert retention_over(3 * day + 1, 3)
    assert not retention_over(3 * day, 3)
    assert not retention_over(None, 3)  # its age unknown (gone meanwhile): left alone
    assert not retention_over(1000 * day, 0)
