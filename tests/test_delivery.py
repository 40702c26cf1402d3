"""Delivery engine: outcomes to states and folder moves, quick retries, splitting, pauses, several destinations.

The PACS here is a scripted stand-in so each outcome class can be forced; the real Orthanc is in tests/integration.
"""

import contextlib
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
from loguru import logger

import relaypacsd.queues
from relaypacsd.delivery import backoff, deliver_parts
from relaypacsd.dicomfile import inspect
from relaypacsd.errors import DestinationProblem, PacsUnreachable
from relaypacsd.models import Part
from relaypacsd.outcomes import Outcome
from relaypacsd.sidecars import sidecar_path
from relaypacsd.spool import Spool
from tests.dicomfactory import write_study
from tests.helpers import ScriptedPacs, count, gated, submit_all, wait_until
from tests.helpers import engine_setup as setup


def break_moves(monkeypatch, folder, times, error):
    """Make the next `times` moves into `folder` raise `error`; return the paths they failed for."""
    real_finish, failures = Spool.finish, []

    def broken_finish(self, path, to, *args, **kwargs):
        if to == folder and len(failures) < times:
            failures.append(path)
            raise error
        return real_finish(self, path, to, *args, **kwargs)

    monkeypatch.setattr(Spool, "finish", broken_finish)
    return failures


def test_all_delivered_go_to_sent_and_are_forgotten(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs])
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 4)
    engine.stop()
    assert count(spool, "sending") == 0 and engine.journal.counts() == {}
    assert sorted(u for c in pacs.calls for u in c) == sorted(sops)
    assert len(pacs.calls) == 1  # one batch, not one request per file


def test_permanent_rejection_goes_to_failed_with_reason_code_and_history(tmp_path):
    bad = {}
    pacs = ScriptedPacs("orthanc", lambda uid, n, c: Outcome.PERMANENT if uid == bad["uid"] else Outcome.DELIVERED)
    engine, spool, sops = setup(tmp_path, [pacs])
    bad["uid"] = sops[1]
    engine.start()
    submit_all(engine, spool)
    assert wait_until(lambda: count(spool, "sent") == 3 and count(spool, "failed") == 1)
    engine.stop()
    failed = next(spool.files("failed"))
    side = json.loads(sidecar_path(failed).read_text())
    assert side["sop_instance_uid"] == sops[1] and side["stage"] == "delivery"
    assert side["pacs"]["orthanc"]["reason_code"] == "0xA900"
    assert "permanent" in side["reason"] and side["history"][-1]["event"] == "failed"


def test_transient_failure_is_retried_quickly_then_delivered(tmp_path):
    pacs = ScriptedPacs("orthanc", lambda uid, n, call: Outcome.TRANSIENT if call == 1 else Outcome.DELIVERED)
    engine, spool, sops = setup(tmp_path, [pacs], n=3, batch_max_instances=10)
    submit_all(engine, spool)  # queue everything first so it goes as one batch
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 3)
    engine.stop()
    assert len(pacs.calls) == 2 and count(spool, "failed") == 0


def test_transient_beyond_quick_tries_waits_in_sending_for_the_sweep(tmp_path):
    state = {"ok": False}
    pacs = ScriptedPacs("orthanc", lambda uid, n, c: Outcome.DELIVERED if state["ok"] else Outcome.TRANSIENT)
    engine, spool, sops = setup(tmp_path, [pacs], n=2, retry_attempts=2, batch_max_instances=10)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: len(pacs.calls) == 2)
    first = str(next(spool.files("sending")))
    assert wait_until(lambda: engine.journal.rows(first)["orthanc"].state == "waiting")  # recorded after send
    assert count(spool, "sending") == 2 and count(spool, "failed") == 0
    row = engine.journal.rows(first)["orthanc"]
    assert row.state == "waiting" and row.attempts == 1 and "transient" in row.last_error
    state["ok"] = True
    assert wait_until(lambda: (engine.sweep() or True) and count(spool, "sent") == 2, timeout=15)
    engine.stop()


def test_whole_batch_failure_is_split_before_blaming_one_file(tmp_path):
    bad = {}
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs], n=5, batch_max_instances=10)
    bad["uid"] = sops[3]
    # like Orthanc's 400 for a batch holding one unparsable part: nothing confirmed, blame unknown
    pacs.rule = lambda uid, n, call: (Outcome.SPLIT if n > 1 and bad["uid"] in pacs.calls[call - 1]
                                      else Outcome.PERMANENT if uid == bad["uid"] else Outcome.DELIVERED)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 4 and count(spool, "failed") == 1)
    engine.stop()
    assert pacs.calls[0] and len(pacs.calls[0]) == 5
    assert [bad["uid"]] in pacs.calls  # finally sent alone


def test_destination_problem_pauses_without_spending_attempts(tmp_path):
    pacs = ScriptedPacs("orthanc")
    pacs.raise_next = [DestinationProblem("PACS 'orthanc' refused our credentials (HTTP 401): check ORTHANC_PASSWORD",
                                          status=401)]
    engine, spool, sops = setup(tmp_path, [pacs], n=2, batch_max_instances=10)
    pacs.probe_error = pacs.raise_next[0]
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: not engine.destinations["orthanc"].healthy)
    time.sleep(0.3)
    assert len(pacs.calls) == 1 and count(spool, "sending") == 2 and count(spool, "failed") == 0
    row = engine.journal.rows(str(next(spool.files("sending"))))["orthanc"]
    assert row.attempts == 0 and "401" in row.last_error
    engine.sweep()
    time.sleep(0.2)
    assert len(pacs.calls) == 1  # nothing is sent while the destination is down
    pacs.probe_error = None
    engine.probe()  # the health probe sees it back: everything waiting goes at once
    assert wait_until(lambda: count(spool, "sent") == 2)
    engine.stop()


def test_unreachable_marks_down_and_resumes_when_back(tmp_path):
    pacs = ScriptedPacs("orthanc")
    pacs.raise_next = [PacsUnreachable("PACS 'orthanc' at http://x: connection refused")]
    pacs.probe_error = pacs.raise_next[0]
    engine, spool, sops = setup(tmp_path, [pacs], n=3, batch_max_instances=10)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: not engine.destinations["orthanc"].healthy)
    assert count(spool, "sending") == 3
    pacs.probe_error = None
    engine.probe()
    assert wait_until(lambda: count(spool, "sent") == 3)
    engine.stop()


def test_two_destinations_each_confirm_once(tmp_path):
    state = {"b_ok": False}
    a = ScriptedPacs("orthanc")
    b = ScriptedPacs("dcm4chee", lambda uid, n, c: Outcome.DELIVERED if state["b_ok"] else Outcome.TRANSIENT)
    engine, spool, sops = setup(tmp_path, [a, b], n=3, retry_attempts=1)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: sum(len(c) for c in a.calls) == 3 and len(b.calls) >= 1)
    time.sleep(0.2)
    assert count(spool, "sending") == 3  # not sent/ until every destination confirmed
    state["b_ok"] = True
    assert wait_until(lambda: (engine.sweep() or True) and count(spool, "sent") == 3, timeout=15)
    engine.stop()
    assert all(a.received(u) == 1 for u in sops)  # a retry for dcm4chee never re-sends to orthanc


def test_restart_with_journal_sends_only_what_is_left(tmp_path):
    a, b = ScriptedPacs("orthanc"), ScriptedPacs("dcm4chee")
    engine, spool, sops = setup(tmp_path, [a, b], n=2)
    for f in list(spool.files("inbox")):
        claimed = spool.claim(f)
        engine.journal.ensure(str(claimed), ["orthanc", "dcm4chee"], sop=inspect(claimed).sop_instance_uid)
        engine.journal.update(str(claimed), "orthanc", state="delivered", event="delivered")
    for f in spool.files("sending"):
        engine.submit(f, spool, inspect(f))
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 2)
    engine.stop()
    assert a.calls == [] and sorted(u for c in b.calls for u in c) == sorted(sops)


def test_limited_outcome_fails_after_a_few_deliveries(tmp_path):
    pacs = ScriptedPacs("orthanc", lambda uid, n, c: Outcome.LIMITED)
    engine, spool, sops = setup(tmp_path, [pacs], n=1, retry_attempts=1)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: (engine.destinations["orthanc"].release_due(everything=True) or True)
                      and count(spool, "failed") == 1, timeout=15)
    engine.stop()
    assert len(pacs.calls) == 3


def test_max_age_sends_to_failed_with_history(tmp_path):
    pacs = ScriptedPacs("orthanc", lambda uid, n, c: Outcome.TRANSIENT)
    engine, spool, sops = setup(tmp_path, [pacs], n=1, retry_attempts=1, max_age_hours=0.0001)
    f = spool.claim(next(spool.files("inbox")))
    engine.journal.ensure(str(f), ["orthanc"], first_seen=time.time() - 3600)
    engine.submit(f, spool, inspect(f))
    engine.start()
    assert wait_until(lambda: count(spool, "failed") == 1)
    engine.stop()
    side = json.loads(sidecar_path(next(spool.files("failed"))).read_text())
    assert "gave up after" in side["reason"]


def test_pacs_disabled_keeps_files_in_sending(tmp_path):
    engine, spool, sops = setup(tmp_path, [], n=2)
    submit_all(engine, spool)
    assert count(spool, "sending") == 2 and engine.in_flight() == 2


def test_backoff_doubles_caps_and_jitters():
    values = [backoff(2, a, 60) for a in range(8)]
    assert 1.6 <= values[0] <= 2.4 and 3.2 <= values[1] <= 4.8
    assert max(values) <= 72 and values[-1] >= 48


def test_files_for_a_pacs_that_stays_down_expire_at_max_age(tmp_path):
    pacs = ScriptedPacs("orthanc")
    pacs.raise_next = [PacsUnreachable("PACS 'orthanc' unreachable: connection refused")]
    pacs.probe_error = pacs.raise_next[0]
    engine, spool, sops = setup(tmp_path, [pacs], n=1, max_age_hours=1)
    f = spool.claim(next(spool.files("inbox")))
    engine.journal.ensure(str(f), ["orthanc"], first_seen=time.time() - 1800)
    engine.submit(f, spool, inspect(f))
    engine.start()
    assert wait_until(lambda: not engine.destinations["orthanc"].healthy)
    assert engine.sweep() == 0 and count(spool, "sending") == 1  # 30 min old: keeps waiting
    item = next(iter(engine.destinations["orthanc"].waiting))
    item.born -= 3600  # now 90 minutes old
    engine.sweep()
    assert wait_until(lambda: count(spool, "failed") == 1)
    engine.stop()
    side = json.loads(sidecar_path(next(spool.files("failed"))).read_text())
    assert "gave up after 1 h" in side["reason"] and "PACS down" in side["reason"]
    assert len(pacs.calls) == 1  # no attempt was spent while it was down


def test_a_reused_file_name_is_never_taken_for_the_file_delivered_before(tmp_path):
    """A kill between forgetting and moving, or a file deleted by hand, leaves rows under a path;
    the next instance dropped under that name must still be sent."""
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    first = spool.claim(next(spool.files("inbox")))
    engine.journal.ensure(str(first), ["orthanc"], sop=inspect(first).sop_instance_uid)
    engine.journal.update(str(first), "orthanc", state="delivered", event="delivered")
    first.unlink()  # gone (say, removed by hand) while its rows stay
    write_study(spool.inbox, 1)  # a new instance under the same name img00000.dcm
    again = spool.claim(next(spool.files("inbox")))
    assert again == first
    engine.submit(again, spool, inspect(again))
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 1)
    engine.stop()
    assert [c for c in pacs.calls] == [[inspect(next(spool.files("sent"))).sop_instance_uid]]


def test_a_failed_name_used_before_does_not_jam_the_journal(tmp_path):
    pacs = ScriptedPacs("orthanc", lambda uid, n, c: Outcome.PERMANENT)
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: count(spool, "failed") == 1)
    failed = next(spool.files("failed"))
    failed.unlink()  # the operator deleted it; its journal rows stay under failed/img00000.dcm
    sidecar_path(failed).unlink()
    write_study(spool.inbox, 1)
    submit_all(engine, spool)
    assert wait_until(lambda: count(spool, "failed") == 1 and engine.in_flight() == 0)
    engine.stop()
    assert next(spool.files("failed")) == failed


def test_files_arriving_while_the_pacs_is_down_also_expire(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs], n=1, max_age_hours=1)
    engine.destinations["orthanc"].set_health(False, "connection refused")
    f = spool.claim(next(spool.files("inbox")))
    engine.journal.ensure(str(f), ["orthanc"], first_seen=time.time() - 7200)
    engine.submit(f, spool, inspect(f))  # queued as ready, never taken while down
    engine.start()
    engine.sweep()
    assert wait_until(lambda: count(spool, "failed") == 1)
    engine.stop()
    assert pacs.calls == []


def test_an_idle_pacs_gets_the_first_files_at_once_a_busy_one_gets_fuller_batches(tmp_path, monkeypatch):
    """Nagle's rule: no request in flight, send what is there; requests in flight, linger to fill."""
    linger = 1.0  # stretched, so that a busy machine's scheduling delays are small beside it
    monkeypatch.setattr(relaypacsd.queues, "BATCH_LINGER", linger)
    engine, spool, _ = setup(tmp_path, [ScriptedPacs("a")], n=2)
    submit_all(engine, spool)
    dest, stop = engine.destinations["a"], threading.Event()
    started = time.monotonic()
    first = dest.take_batch(stop)
    idle_wait = time.monotonic() - started
    assert len(first) == 2 and idle_wait < linger / 2
    dest.put(first[0])  # one request (the first batch) is now in flight
    started = time.monotonic()
    second = dest.take_batch(stop)
    assert second == [first[0]] and time.monotonic() - started >= linger * 0.9
    engine.journal.close()


def test_files_of_the_batch_that_found_the_pacs_down_go_as_soon_as_it_is_back(tmp_path):
    """The PACS is marked down only after the failed batch's files are parked: a probe that finds it back
    right after must release them. Marked down first, they waited for the next sweep (a race)."""
    pacs = ScriptedPacs("orthanc")
    pacs.raise_next = [PacsUnreachable("PACS 'orthanc' at http://x: connection refused")]
    engine, spool, sops = setup(tmp_path, [pacs], n=3, retry_sweep_interval=3600)
    record = engine._record_many

    def slow_record(dest, pairs, *more):  # widen the window between "down" and "parked"
        time.sleep(0.3)
        record(dest, pairs, *more)

    engine._record_many = slow_record
    submit_all(engine, spool)
    engine.start()
    try:
        assert wait_until(lambda: not engine.destinations["orthanc"].healthy)
        engine.probe()  # the PACS answers again
        assert wait_until(lambda: count(spool, "sent") == 3, timeout=3)
    finally:
        engine.stop()


def test_stop_finishes_every_file_the_workers_settled(tmp_path):
    """Files are moved by the finishing thread; stop() must drain it after the workers, not drop it."""
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs], n=6, batch_max_instances=2)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: sum(len(c) for c in pacs.calls) == 6)
    engine.stop()
    assert count(spool, "sent") == 6 and count(spool, "sending") == 0 and engine.in_flight() == 0


def test_a_move_that_keeps_failing_is_retried_by_the_sweep_and_never_resends(tmp_path, monkeypatch):
    """An I/O error while moving delivered files must not strand them in sending/ until a restart, nor
    send them again: each sweep retries only the move."""
    a, b = ScriptedPacs("a"), ScriptedPacs("b")
    engine, spool, sops = setup(tmp_path, [a, b], n=2)
    failures = break_moves(monkeypatch, "sent", 6, PermissionError(13, "Permission denied"))  # three sweeps
    submit_all(engine, spool)
    engine.start()
    try:
        for _ in range(4):  # what each retry sweep does: untracked files in sending/ are submitted again
            assert wait_until(lambda: engine.in_flight() == 0)
            for stuck in list(spool.files("sending")):
                engine.submit(stuck, spool, inspect(stuck))
        assert wait_until(lambda: count(spool, "sent") == 2)
    finally:
        engine.stop()
    assert len(failures) == 6 and count(spool, "sending") == 0
    assert all(a.received(sop) == 1 and b.received(sop) == 1 for sop in sops)
    assert engine.journal.counts() == {}


def test_an_unexpected_error_requeues_only_what_this_pacs_still_owes(tmp_path):
    """A worker's error after some answers were recorded must not queue a file this PACS confirmed."""
    a = ScriptedPacs("a", lambda uid, n, call: Outcome.DELIVERED if uid == sops[0] else Outcome.DESTINATION)
    b = ScriptedPacs("b")  # slow: the file a confirmed is still pending there, so it is not done
    gate = gated(b)
    engine, spool, sops = setup(tmp_path, [a, b], n=2)
    dest = engine.destinations["a"]

    def journal_full(*args, **kwargs):  # recording a's health change fails (disk full, database locked)
        raise sqlite3.OperationalError("database or disk is full")

    dest.set_health = journal_full
    submit_all(engine, spool)
    engine.start()
    try:
        assert wait_until(lambda: a.calls and not dest.busy)
        with dest.cond:
            requeued = {item.info.sop_instance_uid for item in [*dest.ready, *dest.waiting]}
        assert requeued == {sops[1]}  # not sops[0], which a confirmed
    finally:
        gate.set()
        engine.stop()


def test_a_failure_seen_before_the_pacs_came_back_does_not_mark_it_down_again(tmp_path):
    engine, _, _ = setup(tmp_path, [ScriptedPacs("a")], n=0)
    dest = engine.destinations["a"]
    request_began = time.monotonic()
    dest.set_health(False, "connection refused")
    dest.set_health(True)  # the probe found it back while that request was still failing
    dest.set_health(False, "connection refused", failed_since=request_began)
    assert dest.healthy
    dest.set_health(False, "connection refused", failed_since=time.monotonic())  # a new failure counts
    assert not dest.healthy and engine.journal.destinations()["a"]["healthy"] is False
    engine.journal.close()


def test_stop_waits_for_the_request_in_flight_unless_told_to_give_up(tmp_path):
    """A reload must not start a new engine beside a request still in flight: it would send the same
    files again, and the old answer could no longer be recorded. SIGTERM may cut the wait short."""
    pacs = ScriptedPacs("a")
    gate = gated(pacs)
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: engine.destinations["a"].busy == 1)
    assert engine.stop(timeout=60, give_up=lambda: True) is False
    stopped = []
    stopper = threading.Thread(target=lambda: stopped.append(engine.stop(timeout=60)))
    stopper.start()
    time.sleep(0.3)
    assert stopper.is_alive()  # still waiting for the answer
    gate.set()
    stopper.join(5)
    assert stopped == [True] and count(spool, "sent") == 1 and pacs.received(sops[0]) == 1


def test_no_split_and_no_retry_once_stopping():
    """Stopping (or a PACS found down) ends a batch after its request in flight: nothing new is sent."""
    pacs = ScriptedPacs("a", lambda uid, n, call: Outcome.SPLIT)
    parts = [Part(path=Path(f"/x/{i}.dcm"), sop_uid=f"1.2.{i}", size=10) for i in range(8)]
    results = deliver_parts(pacs, parts, 3, 0.0, may_retry=lambda: False)
    assert len(pacs.calls) == 1
    assert {r.outcome for r in results.values()} == {Outcome.TRANSIENT}
    assert all("not split now" in r.reason for r in results.values())


def test_a_failed_row_is_settled_the_file_only_waits_for_its_move_to_failed(tmp_path, monkeypatch):
    """A file rejected by one PACS whose move to failed/ did not happen is moved, not sent again."""
    a = ScriptedPacs("a", lambda uid, n, call: Outcome.PERMANENT)
    engine, spool, sops = setup(tmp_path, [a], n=1)
    failures = break_moves(monkeypatch, "failed", 1, OSError(28, "No space left on device"))
    submit_all(engine, spool)
    engine.start()
    try:
        assert wait_until(lambda: failures and engine.in_flight() == 0)
        stuck = next(spool.files("sending"))
        engine.submit(stuck, spool, inspect(stuck))  # the sweep
        assert wait_until(lambda: count(spool, "failed") == 1)
    finally:
        engine.stop()
    assert a.received(sops[0]) == 1


def test_two_files_with_one_sop_uid_never_share_a_request(tmp_path):
    """The PACS answers per SOP Instance UID: in one request, a refusal of one could read as the other's."""
    pacs = ScriptedPacs("a")
    engine, spool, sops = setup(tmp_path, [pacs], n=2, batch_max_instances=10)
    shutil.copy(next(spool.files("inbox")), spool.inbox / "resent.dcm")  # a second file, same instance
    submit_all(engine, spool)
    engine.start()
    assert wait_until(lambda: count(spool, "sent") == 3)
    engine.stop()
    assert all(len(call) == len(set(call)) for call in pacs.calls) and pacs.received(sops[0]) == 2


# -- one SOPInstanceUID, other content (a corrected resend): a UID conflict, never "delivered" -------------


@contextlib.contextmanager
def captured():
    """Every loguru line emitted inside the block, as 'LEVEL message'."""
    lines = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="DEBUG", format="{level} {message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def corrected_copy(src, dest, name="CORRECTED^NAME"):
    """`dest`: the instance of `src` with one tag changed, its SOPInstanceUID kept (a corrected resend)."""
    ds = pydicom.dcmread(src)
    ds.PatientName = name
    ds.save_as(dest, enforce_file_format=True)
    return dest


def settle(engine, spool, sent, failed):
    submit_all(engine, spool)
    assert wait_until(lambda: count(spool, "sent") == sent and count(spool, "failed") == failed
                      and engine.in_flight() == 0)


def test_a_delivered_uid_with_other_content_is_a_uid_conflict_not_delivered(tmp_path):
    pacs = ScriptedPacs("orthanc")  # answers "stored" to everything, as Orthanc does
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    engine.journal.set_health("orthanc", True)  # the probe's first word: the counters' row
    engine.start()
    try:
        settle(engine, spool, 1, 0)
        a = next(spool.files("sent"))
        corrected_copy(a, spool.inbox / "b.dcm")
        with captured() as log:
            settle(engine, spool, 1, 1)
    finally:
        engine.stop()
    assert pacs.received(sops[0]) == 2  # it was sent: the sidecar says what the PACS answered
    b = next(spool.files("failed"))
    assert b.name == "b.dcm" and [p.name for p in spool.files("sent")] == [a.name]
    side = json.loads(sidecar_path(b).read_text())
    conflict = side["uid_conflict"]["orthanc"]
    assert conflict["earlier_file"] == a.name and conflict["earlier_delivered"]
    assert conflict["pacs_answer"] == {"http_status": 200, "answer": "stored", "reason": "scripted delivered"}
    assert "may have kept that earlier version" in side["reason"]
    assert "new SOPInstanceUID" in side["next_step"] and "relaypacsd retry FILE" in side["next_step"]
    assert side["pacs"]["orthanc"]["state"] == "failed" and side["history"][-1]["event"] == "uid_conflict"
    assert [l for l in log if l.startswith(f"ERROR PACS forward orthanc UID conflict: b.dcm uid={sops[0]}: ")]
    # never logged as delivered, not even for a moment before the conflict is found
    assert not [l for l in log if "PACS forward orthanc delivered" in l and "b.dcm" in l], log
    assert engine.journal.destinations()["orthanc"]["failed"] == 1
    assert _conflicts(engine.journal) == {"orthanc": 1}


def _conflicts(journal):
    return dict(journal._exec("SELECT dest, conflicts FROM destinations"))


def sent_then_corrected(tmp_path, pacs):
    """One file delivered to `pacs`, then a corrected copy (same SOPInstanceUID, other bytes) settled."""
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    engine.start()
    try:
        settle(engine, spool, 1, 0)
        corrected_copy(next(spool.files("sent")), spool.inbox / "b.dcm")
        settle(engine, spool, 1, 1)
    finally:
        engine.stop()
    return engine, spool, sops


def test_a_duplicate_answer_for_other_content_is_a_uid_conflict_too(tmp_path):
    """A PACS answering 'already stored' (0x0111 and kin) for the corrected file has the earlier one."""
    pacs = ScriptedPacs("orthanc", lambda uid, n, call: Outcome.DELIVERED if call == 1 else Outcome.DUPLICATE)
    engine, spool, sops = sent_then_corrected(tmp_path, pacs)
    side = json.loads(sidecar_path(next(spool.files("failed"))).read_text())
    assert side["uid_conflict"]["orthanc"]["pacs_answer"]["answer"] == "duplicate"


def test_the_same_bytes_again_are_a_plain_duplicate_delivered(tmp_path):
    pacs = ScriptedPacs("orthanc", lambda uid, n, call: Outcome.DELIVERED if call == 1 else Outcome.DUPLICATE)
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    engine.journal.set_health("orthanc", True)
    engine.start()
    try:
        settle(engine, spool, 1, 0)
        shutil.copy(next(spool.files("sent")), spool.inbox / "again.dcm")
        settle(engine, spool, 2, 0)
    finally:
        engine.stop()
    assert pacs.received(sops[0]) == 2 and _conflicts(engine.journal) == {"orthanc": 0}


def test_the_conflict_is_per_pacs(tmp_path):
    """A PACS that never had the earlier version takes the corrected file; only the other one conflicts."""
    a, b = ScriptedPacs("a"), ScriptedPacs("b")
    engine, spool, sops = setup(tmp_path, [a, b], n=1)
    engine.start()
    try:
        settle(engine, spool, 1, 0)
        engine.journal._exec("DELETE FROM instances WHERE dest = 'b'")  # b got the first version elsewhere
        corrected_copy(next(spool.files("sent")), spool.inbox / "b.dcm")
        settle(engine, spool, 1, 1)
    finally:
        engine.stop()
    side = json.loads(sidecar_path(next(spool.files("failed"))).read_text())
    assert set(side["uid_conflict"]) == {"a"} and side["pacs"]["b"]["state"] == "delivered"


def test_two_versions_in_flight_at_once_go_one_after_the_other_and_the_second_conflicts(tmp_path):
    """Dropped together, with two workers: were both in requests at once, the journal could not know which
    version the PACS got first (and kept)."""
    pacs = ScriptedPacs("orthanc")
    in_flight, overlap, send = [], [], pacs.send

    def slow_send(parts):
        in_flight.extend(p.sop_uid for p in parts)
        overlap.append(len(in_flight) != len(set(in_flight)))
        time.sleep(0.2)
        try:
            return send(parts)
        finally:
            for p in parts:
                in_flight.remove(p.sop_uid)

    pacs.send = slow_send
    engine, spool, sops = setup(tmp_path, [pacs], n=1, workers_per_pacs=2, batch_max_instances=10)
    first = next(spool.files("inbox"))
    corrected_copy(first, spool.inbox / "zz-corrected.dcm")
    submit_all(engine, spool)  # img00000.dcm is queued first
    engine.start()
    try:
        assert wait_until(lambda: count(spool, "sent") == 1 and count(spool, "failed") == 1)
    finally:
        engine.stop()
    assert overlap == [False, False] and pacs.received(sops[0]) == 2
    assert [p.name for p in spool.files("sent")] == [first.name]
    assert [p.name for p in spool.files("failed")] == ["zz-corrected.dcm"]


def test_the_operators_retry_of_a_uid_conflict_lets_it_through(tmp_path):
    from relaypacsd.requeue import requeue

    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    engine.start()
    try:
        settle(engine, spool, 1, 0)
        corrected_copy(next(spool.files("sent")), spool.inbox / "b.dcm")
        settle(engine, spool, 1, 1)
        done = requeue(spool, engine.journal, next(spool.files("failed")))
        new = done.new_path
        assert done.reset_dests == ["orthanc"]
        engine.submit(new, spool, inspect(new))
        assert wait_until(lambda: count(spool, "sent") == 2 and count(spool, "failed") == 0)
    finally:
        engine.stop()
    b = spool.sent / "b.dcm"
    known = engine.journal.known_instances("orthanc", [sops[0]])[sops[0]]
    assert known.digest == inspect(b).digest  # the PACS now counts as having the corrected version


def test_a_retry_of_another_failure_keeps_the_memory_of_the_uid(tmp_path):
    """Only a UID conflict's retry forgets the earlier version; a file refused for another reason does not."""
    pacs = ScriptedPacs("orthanc", lambda uid, n, call: Outcome.DELIVERED if call == 1 else Outcome.PERMANENT)
    engine, spool, sops = sent_then_corrected(tmp_path, pacs)
    assert engine.journal.reset_failed(str(next(spool.files("failed")))) == ["orthanc"]
    assert engine.journal.known_instances("orthanc", [sops[0]])


# -- the engine's memory of each destination's verdict: rows that vanish are no "sent" -----------------


def _deferred_finish(engine):
    """Hold settled items back from _finish (the window between the answer and the move); returns them."""
    held = []
    engine._hand_over = held.extend
    return held


def test_rows_removed_after_a_rejection_do_not_make_the_file_sent(tmp_path):
    """`relaypacsd retry` racing a claim of the same name used to delete the daemon's fresh rows; _finish then
    found no 'failed' row and moved a rejected file to sent/."""
    pacs = ScriptedPacs("orthanc", lambda uid, n, call: Outcome.PERMANENT)
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    held = _deferred_finish(engine)
    submit_all(engine, spool)
    dest = engine.destinations["orthanc"]
    engine._deliver(dest, dest.take_batch(threading.Event()))
    (item,) = held
    engine.journal.forget(str(item.path))  # what the racing retry's cleanup did
    with captured() as log:
        engine._finish(held)
    assert count(spool, "sent") == 0 and count(spool, "failed") == 1
    failed = next(spool.files("failed"))
    side = json.loads(sidecar_path(failed).read_text())
    assert side["pacs"]["orthanc"]["state"] == "failed" and "permanent" in side["reason"]
    assert {d: r.state for d, r in engine.journal.rows(str(failed)).items()} == {"orthanc": "failed"}
    assert any("went missing" in l and l.startswith("WARNING") for l in log)
    engine.journal.close()


def test_rows_removed_after_every_pacs_confirmed_still_make_the_file_sent(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    held = _deferred_finish(engine)
    submit_all(engine, spool)
    dest = engine.destinations["orthanc"]
    engine._deliver(dest, dest.take_batch(threading.Event()))
    engine.journal.forget(str(held[0].path))
    engine._finish(held)
    assert count(spool, "sent") == 1 and engine.journal.counts() == {}
    engine.journal.close()


def test_a_file_with_neither_rows_nor_a_verdict_in_memory_stays_in_sending(tmp_path):
    """Submitted with every row settled (an earlier run's verdict), then the rows vanish: unknown, not sent."""
    pacs = ScriptedPacs("orthanc")
    engine, spool, sops = setup(tmp_path, [pacs], n=1)
    held = _deferred_finish(engine)
    f = spool.claim(next(spool.files("inbox")))
    engine.journal.ensure(str(f), ["orthanc"], sop=sops[0])
    engine.journal.update(str(f), "orthanc", state="failed", event="failed", detail="permanent: nope")
    engine.submit(f, spool, inspect(f))
    engine.journal.forget(str(f))
    engine._finish(held)
    assert list(spool.files("sending")) == [f] and engine.in_flight() == 0 and pacs.calls == []
    engine.journal.close()


def test_a_forward_step_of_the_clock_does_not_expire_a_waiting_file(tmp_path, monkeypatch):
    """NTP or a resumed VM steps the clock 100 h forward: a file that waited seconds is no 72 h old file."""
    pacs = ScriptedPacs("orthanc", lambda uid, n, call: Outcome.TRANSIENT if call <= 2 else Outcome.DELIVERED)
    engine, spool, sops = setup(tmp_path, [pacs], n=1, retry_attempts=1, max_age_hours=72)
    dest = engine.destinations["orthanc"]
    submit_all(engine, spool)
    engine.start()
    try:
        assert wait_until(lambda: len(dest.waiting) == 1)  # parked after its first try
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 100 * 3600)
        engine.sweep()  # the sweep's age check
        dest.release_due(everything=True)  # its second try fails again: the delivery's age check
        assert wait_until(lambda: len(pacs.calls) == 2 and len(dest.waiting) == 1)
        dest.release_due(everything=True)
        assert wait_until(lambda: count(spool, "sent") == 1)
        assert count(spool, "failed") == 0
    finally:
        engine.stop()


def test_a_confirmation_that_comes_back_after_the_file_changed_is_still_remembered_for_its_uid(tmp_path):
    """PACS x confirms the validated bytes while PACS y finds the file rewritten (dropped, validated again): x
    keeps the first version, so the new version's "stored" at x is a UID conflict, never delivered."""
    from relaypacsd.errors import PartChanged

    x, y = ScriptedPacs("x"), ScriptedPacs("y")
    engine, spool, sops = setup(tmp_path, [x, y], n=1)
    changed = []
    engine.on_changed = lambda item, gone: changed.append(item)
    submit_all(engine, spool)
    dx, dy = engine.destinations["x"], engine.destinations["y"]
    bx, by = dx.take_batch(threading.Event()), dy.take_batch(threading.Event())
    path, size = bx[0].path, bx[0].info.size
    send_x = x.send

    def x_answers_after_the_rewrite(parts):  # x read the validated bytes; its answer is still on the way
        corrected_copy(path, tmp_path / "new.dcm", name="REWRITTEN^WHILE^X^WAS^STORING^IT")
        (tmp_path / "new.dcm").replace(path)
        y.raise_next.append(PartChanged(path, size, path.stat().st_size))
        engine._deliver(dy, by)
        dy.done_with(by)
        return send_x(parts)

    x.send = x_answers_after_the_rewrite
    engine._deliver(dx, bx)
    dx.done_with(bx)
    assert [i.path for i in changed] == [path] and path.stat().st_size != size
    x.send = send_x
    engine.submit(path, spool, inspect(path))  # validated again: the new version
    for dest in (dx, dy):
        batch = dest.take_batch(threading.Event())
        engine._deliver(dest, batch)
        dest.done_with(batch)
    assert count(spool, "sent") == 0 and count(spool, "failed") == 1
    side = json.loads(sidecar_path(next(spool.files("failed"))).read_text())
    assert set(side["uid_conflict"]) == {"x"} and side["pacs"]["y"]["state"] == "delivered"
    engine.journal.close()


def test_a_verdict_in_memory_is_written_back_when_another_pacs_verdict_is_lost(tmp_path):
    """Rows vanish under a file that b confirmed in an earlier run and a in this one: b's verdict is lost, so
    the file stays for b; a, which confirmed it, must not get it again."""
    a, b = ScriptedPacs("a"), ScriptedPacs("b")
    engine, spool, sops = setup(tmp_path, [a, b], n=1)
    held = _deferred_finish(engine)
    f = spool.claim(next(spool.files("inbox")))
    engine.journal.ensure(str(f), ["a", "b"], sop=sops[0])
    engine.journal.update(str(f), "b", state="delivered", event="delivered")  # an earlier run's verdict
    engine.submit(f, spool, inspect(f))
    da = engine.destinations["a"]
    batch = da.take_batch(threading.Event())
    engine._deliver(da, batch)
    da.done_with(batch)
    engine.journal.forget(str(f))  # what a racing retry's cleanup did
    engine._finish(held)
    assert list(spool.files("sending")) == [f] and engine.in_flight() == 0
    engine._hand_over = engine._finish
    engine.submit(f, spool, inspect(f))  # the next sweep takes it up again
    for dest in engine.destinations.values():
        with dest.cond:
            ready = bool(dest.ready)
        if ready:
            batch = dest.take_batch(threading.Event())
            engine._deliver(dest, batch)
            dest.done_with(batch)
    assert count(spool, "sent") == 1
    assert a.received(sops[0]) == 1 and b.received(sops[0]) == 1
    engine.journal.close()


def test_an_answer_for_the_old_version_never_lands_on_the_rows_of_the_new_one(tmp_path):
    """x's answer for the validated bytes is being recorded while y drops the rewritten file and the new version
    is submitted under the same name: x's 'delivered' must not become the new version's (after a restart it
    would go to sent/ without x ever confirming it)."""
    from relaypacsd.errors import PartChanged

    x, y = ScriptedPacs("x"), ScriptedPacs("y")
    engine, spool, sops = setup(tmp_path, [x, y], n=1)
    resubmitted = threading.Event()

    def validated_again(item, gone):
        engine.submit(item.path, spool, inspect(item.path))
        resubmitted.set()

    engine.on_changed = validated_again
    submit_all(engine, spool)
    dx, dy = engine.destinations["x"], engine.destinations["y"]
    bx, by = dx.take_batch(threading.Event()), dy.take_batch(threading.Event())
    path, size = bx[0].path, bx[0].info.size
    rows_at, ys = engine.journal.rows_at, []

    def y_drops_it_meanwhile(dest, paths):  # between x's look at its items and its commit
        if dest == "x" and not ys:
            corrected_copy(path, tmp_path / "new.dcm", name="REWRITTEN^WHILE^X^WAS^RECORDING")
            (tmp_path / "new.dcm").replace(path)
            y.raise_next.append(PartChanged(path, size, path.stat().st_size))
            ys.append(threading.Thread(target=engine._deliver, args=(dy, by)))
            ys[0].start()
            resubmitted.wait(1)  # it cannot happen in this window once the window is closed
        return rows_at(dest, paths)

    engine.journal.rows_at = y_drops_it_meanwhile
    engine._deliver(dx, bx)
    ys[0].join(10)
    assert resubmitted.is_set() and engine.known(path)
    assert {d: r.state for d, r in engine.journal.rows(str(path)).items()} == {"x": "pending", "y": "pending"}
    engine.journal.close()
