"""relaypacsd.outcomes: every reconcile rule, the FailureReason table, tolerance of junk bodies."""

from __future__ import annotations

import pytest

from relaypacsd.outcomes import (
    InstanceResult,
    Outcome,
    classify_reason,
    describe_reason,
    reconcile,
    results_for_error,
)

A, B, C = "1.2.3.1", "1.2.3.2", "1.2.3.3"


def ref(*uids: str, warning: int | None = None) -> dict:
    items = []
    for uid in uids:
        item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [uid]}}
        if warning is not None:
            item["00081196"] = {"vr": "US", "Value": [warning]}
        items.append(item)
    return {"00081199": {"vr": "SQ", "Value": items}}


def failed(uid: str, reason: int | str | None) -> dict:
    item = {"00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return {"00081198": {"vr": "SQ", "Value": [item]}}


def merge(*docs: dict) -> dict:
    out: dict = {}
    for d in docs:
        for tag, element in d.items():
            out.setdefault(tag, {"vr": "SQ", "Value": []})["Value"].extend(element["Value"])
    return out


def outcomes(results: list[InstanceResult]) -> list[Outcome]:
    return [r.outcome for r in results]


@pytest.mark.parametrize("code,expected", [
    (0xA700, Outcome.TRANSIENT), (0xA7FF, Outcome.TRANSIENT), (0x0213, Outcome.TRANSIENT),
    (0xA900, Outcome.PERMANENT), (0xA9AB, Outcome.PERMANENT),
    (0xC000, Outcome.PERMANENT), (0xC122, Outcome.PERMANENT), (0xCFFF, Outcome.PERMANENT),
    (0x0122, Outcome.PERMANENT),
    (0x0110, Outcome.LIMITED), (0x1234, Outcome.LIMITED), (0xFFFF, Outcome.LIMITED),
    (0x0111, Outcome.DUPLICATE), (0xA770, Outcome.DUPLICATE), (45070, Outcome.DUPLICATE),
    (0x0124, Outcome.TRANSIENT),
])
def test_classify_reason_table(code: int, expected: Outcome) -> None:
    assert classify_reason(code) is expected


@pytest.mark.parametrize("code,words", [
    (0xA700, "out of resources (A7xx)"), (0xA712, "out of resources (A7xx)"),
    (0xC122, "transfer syntax not supported"), (0xC001, "cannot understand (Cxxx)"),
    (0x0110, "processing failure"), (0x0122, "SOP class not supported"),
    (0xB000, "coercion of data elements"), (0xB006, "elements discarded"),
    (0xA900, "data set does not match SOP class"),
])
def test_describe_reason(code: int, words: str) -> None:
    assert words in describe_reason(code)


def test_delivered_only_when_referenced() -> None:
    [r] = reconcile(200, ref(A), [A])
    assert r == InstanceResult(A, Outcome.DELIVERED, 200, None, r.reason)
    assert r.outcome.delivered


def test_warning_reason_still_delivered_and_mentioned() -> None:
    [r] = reconcile(202, ref(A, warning=0xB000), [A])
    assert r.outcome is Outcome.DELIVERED
    assert r.reason_code == 0xB000
    assert "0xB000" in r.reason and "coercion" in r.reason


def test_failure_reason_given_in_decimal() -> None:
    # DICOM JSON encodes US as a decimal number: 272 == 0x0110.
    [r] = reconcile(409, failed(A, 272), [A])
    assert r.outcome is Outcome.LIMITED
    assert r.reason_code == 0x0110
    assert "0x0110" in r.reason and "processing failure" in r.reason


@pytest.mark.parametrize("code,expected", [
    (0xA700, Outcome.TRANSIENT), (0xC122, Outcome.PERMANENT), (0x0122, Outcome.PERMANENT),
    (0x0111, Outcome.DUPLICATE), (45070, Outcome.DUPLICATE), (0xA770, Outcome.DUPLICATE),
    (0x0124, Outcome.TRANSIENT),
])
def test_failed_sop_classified(code: int, expected: Outcome) -> None:
    [r] = reconcile(202, failed(A, code), [A])
    assert r.outcome is expected
    assert r.outcome.delivered == (expected is Outcome.DUPLICATE)


def test_failure_reason_as_string_tolerated() -> None:
    assert reconcile(409, failed(A, "0xC122"), [A])[0].outcome is Outcome.PERMANENT
    assert reconcile(409, failed(A, "49442"), [A])[0].outcome is Outcome.PERMANENT
    [r] = reconcile(409, failed(A, None), [A])
    assert r.outcome is Outcome.LIMITED and r.reason_code is None


def test_mixed_batch_order_preserved() -> None:
    body = merge(ref(A), failed(C, 0xA700))
    results = reconcile(202, body, [C, B, A])
    assert [r.sop_uid for r in results] == [C, B, A]
    assert outcomes(results) == [Outcome.TRANSIENT, Outcome.SPLIT, Outcome.DELIVERED]


def test_orthanc_400_with_good_part_referenced() -> None:
    # Measured: 1 good + 1 garbage -> 400, the good one listed, FailedSOP empty, good one stored.
    results = reconcile(400, ref(A), [A, B])
    assert outcomes(results) == [Outcome.DELIVERED, Outcome.SPLIT]


@pytest.mark.parametrize("status", [200, 202])
def test_single_unconfirmed_2xx_is_limited(status: int) -> None:
    [r] = reconcile(status, {}, [A])
    assert r.outcome is Outcome.LIMITED
    assert "did not confirm" in r.reason


def test_202_without_body() -> None:
    assert outcomes(reconcile(202, None, [A])) == [Outcome.LIMITED]
    assert outcomes(reconcile(202, None, [A, B])) == [Outcome.SPLIT, Outcome.SPLIT]


@pytest.mark.parametrize("status", [400, 409])
def test_single_400_409_without_detail_permanent(status: int) -> None:
    assert outcomes(reconcile(status, None, [A])) == [Outcome.PERMANENT]


def test_a_nul_padded_uid_in_the_answer_still_confirms() -> None:
    """UI values may be padded with NUL (PS3.5 6.2); ours are sent stripped."""
    assert outcomes(reconcile(200, ref(A + "\0"), [A])) == [Outcome.DELIVERED]


def test_413() -> None:
    [r] = reconcile(413, None, [A])  # the PACS's (or proxy's) limit: the file waits, never blamed
    assert r.outcome is Outcome.TRANSIENT and "too large" in r.reason and "client_max_body_size" in r.reason
    assert outcomes(reconcile(413, None, [A, B, C])) == [Outcome.SPLIT] * 3


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_busy_or_failing_server_transient(status: int) -> None:
    assert outcomes(reconcile(status, None, [A])) == [Outcome.TRANSIENT]
    # A busy server asked us to slow down: never multiply requests by splitting.
    assert outcomes(reconcile(status, None, [A, B])) == [Outcome.TRANSIENT] * 2


@pytest.mark.parametrize("status", [401, 403, 404, 405, 415])
def test_destination_statuses_whatever_the_body(status: int) -> None:
    results = reconcile(status, ref(A), [A, B])
    assert outcomes(results) == [Outcome.DESTINATION] * 2
    assert all(r.http_status == status for r in results)


def test_batch_unconfirmed_200_is_split() -> None:
    # Orthanc with a full disk: 200, nothing referenced, nothing failed, nothing stored.
    assert outcomes(reconcile(200, {}, [A, B, C])) == [Outcome.SPLIT] * 3


@pytest.mark.parametrize("body", [
    [], "junk", {"00081199": "x"}, {"00081199": {"Value": "x"}}, {"00081199": {"Value": [1, None, {}]}},
    {"00081199": {"Value": [{"00081155": {"Value": []}}]}},
])
def test_junk_bodies_never_deliver(body: object) -> None:
    assert outcomes(reconcile(200, body, [A])) == [Outcome.LIMITED]  # type: ignore[arg-type]


def test_results_for_error() -> None:
    results = results_for_error([A, B], Outcome.TRANSIENT, "connection refused")
    assert outcomes(results) == [Outcome.TRANSIENT] * 2
    assert results[0] == InstanceResult(A, Outcome.TRANSIENT, None, None, "connection refused")
    assert results_for_error([A], Outcome.DESTINATION, "x", 401)[0].http_status == 401
