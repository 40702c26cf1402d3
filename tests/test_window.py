"""The active window (#14 item 7): at most `active_window` files in memory, the rest in the journal's backlog,
taken in as the window drains; every file still sent once per PACS, in the order it came."""

import threading

import pytest

from relaypacsd import dicomfile
from relaypacsd.config import build_config
from relaypacsd.delivery import Engine
from relaypacsd.dicomfile import inspect
from relaypacsd.intake import Intake
from relaypacsd.journal import open_journal
from relaypacsd.spool import Spool
from relaypacsd.untracked import UntrackedScan
from relaypacsd.window import Window
from tests.dicomfactory import write_study
from tests.helpers import ScriptedPacs, count, wait_until


def setup(tmp_path, senders, n, window, state=None, **delivery):
    config = build_config({"watch": [{"path": str(tmp_path / "root")}],
                           "delivery": {"retry_delay": 0.01, "workers_per_pacs": 1, "batch_max_instances": 4,
                                        "active_window": window, **delivery},
                           "pacs": {s.name: {"url": s.target} for s in senders}}, {})
    spool = Spool(tmp_path / "root")
    spool.prepare()
    write_study(spool.sending, n)
    revalidated = []
    engine = Engine(config, open_journal(state or tmp_path / "state"), {s.name: s for s in senders}, spools=[spool],
                    revalidate=lambda s, p: revalidated.append(p))
    return engine, spool, revalidated


def watch_peak(window: Window) -> dict:
    """Record the most files the window ever held (checked at each add)."""
    peak, add = {"held": 0}, window.add

    def counting(item, reserved):
        added = add(item, reserved)
        peak["held"] = max(peak["held"], window.held())
        return added

    window.add = counting
    return peak


def submit_all(engine, spool):
    for path in sorted(spool.files("sending")):
        engine.submit(path, spool, inspect(path))


def delivered_once(pacs, spool):
    uids = [u for call in pacs.calls for u in call]
    return len(uids) == len(set(uids)) == count(spool, "sent")


def test_the_window_holds_at_most_its_size_and_the_rest_wait_in_the_backlog_until_the_pacs_returns(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, _ = setup(tmp_path, [pacs], n=23, window=5)
    peak = watch_peak(engine.window)
    dest = engine.destinations["orthanc"]
    dest.set_health(False, "connection refused")  # the PACS is away
    engine.start()
    try:
        submit_all(engine, spool)
        assert engine.window.held() == 5 and engine.journal.backlog_counts(["orthanc"]) == {"orthanc": 18}
        assert engine.in_flight() == 23 and dest.queued() == 23  # the figures count the backlog
        assert pacs.calls == []
        dest.set_health(True)
        assert wait_until(lambda: count(spool, "sent") == 23)
    finally:
        engine.stop()
    assert peak["held"] <= 5
    assert delivered_once(pacs, spool) and count(spool, "sending") == 0
    assert engine.journal.counts() == {} and engine.in_flight() == 0


def test_files_are_sent_in_the_order_they_came_across_the_backlog(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, _ = setup(tmp_path, [pacs], n=17, window=4, batch_max_instances=2)
    engine.destinations["orthanc"].set_health(False, "away")
    engine.start()
    try:
        submit_all(engine, spool)
        order = [inspect(p).sop_instance_uid for p in sorted(spool.files("sending"))]
        engine.destinations["orthanc"].set_health(True)
        assert wait_until(lambda: count(spool, "sent") == 17)
    finally:
        engine.stop()
    assert [u for call in pacs.calls for u in call] == order


def test_files_arriving_while_others_wait_in_the_backlog_queue_behind_them(tmp_path):
    """Once any file waits in the backlog, a new one goes there too, even with room in the window: first come,
    first sent."""
    pacs = ScriptedPacs("orthanc")
    engine, spool, _ = setup(tmp_path, [pacs], n=8, window=4)
    paths = sorted(spool.files("sending"))
    engine.destinations["orthanc"].set_health(False, "away")
    for path in paths[:6]:
        engine.submit(path, spool, inspect(path))
    engine._untrack(list(engine._items.values())[:2])  # room in the window (as if two had gone)
    engine.submit(paths[6], spool, inspect(paths[6]))
    assert paths[6] not in engine._items
    assert engine.journal.backlogged([str(p) for p in paths]) == {str(p) for p in paths[4:7]}
    engine.journal.close()


def test_a_file_owed_to_two_pacs_is_taken_in_once_and_sent_once_to_each(tmp_path):
    a, b = ScriptedPacs("a"), ScriptedPacs("b")
    engine, spool, _ = setup(tmp_path, [a, b], n=11, window=3)
    for d in engine.destinations.values():
        d.set_health(False, "away")
    engine.start()
    try:
        submit_all(engine, spool)
        assert engine.journal.backlog_counts(["a", "b"]) == {"a": 8, "b": 8}
        engine.destinations["b"].set_health(True)
        assert wait_until(lambda: sum(map(len, b.calls)) == 11)
        assert count(spool, "sent") == 0  # a still owes them all
        engine.destinations["a"].set_health(True)
        assert wait_until(lambda: count(spool, "sent") == 11)
    finally:
        engine.stop()
    for pacs in (a, b):
        uids = [u for call in pacs.calls for u in call]
        assert len(uids) == len(set(uids)) == 11


def test_a_new_engine_takes_the_backlog_from_the_journal_without_reading_the_files(tmp_path, monkeypatch):
    """A restart with a million files waiting: they are described by their rows, not validated again."""
    pacs = ScriptedPacs("orthanc")
    engine, spool, _ = setup(tmp_path, [pacs], n=9, window=2)
    engine.destinations["orthanc"].set_health(False, "away")
    submit_all(engine, spool)
    engine.journal.close()
    later, _, revalidated = setup(tmp_path / "again", [pacs], n=0, window=2, state=tmp_path / "state")
    later.holder.spools = [spool]
    monkeypatch.setattr(dicomfile, "inspect", lambda *a, **k: pytest.fail("a file was read again"))
    later.start()
    try:
        assert wait_until(lambda: count(spool, "sent") == 7)  # the two held before never reached the backlog
    finally:
        later.stop()
    assert revalidated == [] and delivered_once(pacs, spool)


def test_rows_without_facts_are_handed_back_for_validation(tmp_path):
    """Rows written before the journal kept a file's study, size and digest: the file is read again."""
    pacs = ScriptedPacs("orthanc")
    engine, spool, revalidated = setup(tmp_path, [pacs], n=1, window=5)
    [path] = spool.files("sending")
    engine.journal.ensure(str(path), ["orthanc"], sop=inspect(path).sop_instance_uid)
    engine.journal.to_backlog([str(path)])
    assert engine.window.refill() == 1
    assert revalidated == [path] and not engine.known(path)
    assert engine.journal.backlogged([str(path)]) == set()  # taken: validation places it again
    engine.journal.close()


def test_the_untracked_scan_queues_only_what_neither_the_window_nor_the_backlog_holds(tmp_path):
    pacs = ScriptedPacs("orthanc")
    engine, spool, _ = setup(tmp_path, [pacs], n=6, window=2)
    paths = sorted(spool.files("sending"))
    for path in paths[:5]:
        engine.submit(path, spool, inspect(path))  # two held, three in the backlog, one untracked
    queued = []
    scan = UntrackedScan([spool], engine.known, engine.journal.backlogged, lambda s, p: queued.append(p),
                         threading.Event())
    assert scan.scan() == 1 and queued == [paths[5]]
    engine.journal.close()


def test_a_scanner_waits_while_the_intake_is_full_and_validators_never_do(tmp_path):
    intake = Intake(lambda spool, path: None, validators=1, limit=2, group=1)
    stop, spool = threading.Event(), Spool(tmp_path)
    intake.put(spool, tmp_path / "a")
    intake.put(spool, tmp_path / "b")
    intake.put(spool, tmp_path / "zip-member")  # a validator's own put: never waits
    waiting = threading.Thread(target=intake.put, args=(spool, tmp_path / "c", stop))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # full: the scanner waits
    assert intake.loop() and intake.loop()  # two validated: room
    waiting.join(2)
    assert not waiting.is_alive() and intake.queue.qsize() == 2
    stop.set()
    intake.put(spool, tmp_path / "d", stop)  # stopping: no wait


def test_a_validator_takes_the_files_waiting_and_submits_the_valid_ones_together(tmp_path):
    """A validator takes up to `group` files that wait already (never waiting for more), submits the first valid
    one at once and the others in one call (one journal commit); a file whose validation fails stays out alone."""
    submitted: list[list[str]] = []

    def check(spool, path):
        if path.name == "bad":
            raise RuntimeError("a bug")
        return None if path.name == "refused" else path.name

    intake = Intake(check, validators=1, submit=submitted.append, group=3)
    spool = Spool(tmp_path)
    for name in ("a", "bad", "refused", "b", "c"):
        intake.put(spool, tmp_path / name)
    assert intake.loop() and submitted == [["a"]]  # a, bad, refused: the group of three
    intake.shutdown()
    assert not intake.loop()  # b, c, then this validator's stop: both submitted before it ends
    # The first valid file of a group goes alone, at once (a burst's first file waits for no other)
    assert submitted == [["a"], ["b"], ["c"]] and intake.pending_paths() == set()
    intake = Intake(check, validators=1, submit=submitted.append, group=3)
    for name in ("d", "e", "f"):
        intake.put(spool, tmp_path / name)
    assert intake.loop() and submitted[3:] == [["d"], ["e", "f"]]


def test_files_owed_only_to_a_pacs_that_is_down_make_room_for_another_that_is_up(tmp_path):
    """A full window of files that PACS b has confirmed and a (away) still owes must not stall b."""
    a, b = ScriptedPacs("a"), ScriptedPacs("b")
    engine, spool, _ = setup(tmp_path, [a, b], n=30, window=4)
    engine.destinations["a"].set_health(False, "away")
    engine.start()
    try:
        submit_all(engine, spool)
        assert wait_until(lambda: sum(map(len, b.calls)) == 30)
        assert count(spool, "sent") == 0 and engine.window.held() <= 4
        engine.sweep()  # the figures counted again: a's files all wait in the backlog
        assert engine.journal.backlog_counts(["a", "b"])["b"] == 0
        engine.destinations["a"].set_health(True)
        assert wait_until(lambda: count(spool, "sent") == 30)
    finally:
        engine.stop()
    for pacs in (a, b):
        uids = [u for call in pacs.calls for u in call]
        assert len(uids) == len(set(uids)) == 30


def test_a_file_parked_for_a_distant_retry_makes_room_and_comes_back_when_due(tmp_path):
    from relaypacsd.outcomes import Outcome

    tries = {}

    def rule(uid, n, call):  # the first file fails once, transiently; the others go
        tries[uid] = tries.get(uid, 0) + 1
        return Outcome.TRANSIENT if uid == first and tries[uid] == 1 else Outcome.DELIVERED

    pacs = ScriptedPacs("orthanc", rule)
    engine, spool, _ = setup(tmp_path, [pacs], n=10, window=1, retry_attempts=1, retry_delay=600,
                             batch_max_instances=1)
    paths = sorted(spool.files("sending"))
    first = inspect(paths[0]).sop_instance_uid
    submit_all(engine, spool)  # one held, nine in the backlog
    engine.start()
    try:
        # The first is parked ten minutes away in the window's one slot; once the sweep lets it go, the nine
        # others pass it.
        assert wait_until(lambda: (engine.sweep() or True) and count(spool, "sent") == 9)
        assert engine.journal.backlogged([str(paths[0])]) == {str(paths[0])}
        engine.window.poke(ahead=True)  # as when its time has come (or the PACS comes back)
        assert wait_until(lambda: count(spool, "sent") == 10)
    finally:
        engine.stop()
    assert tries[first] == 2 and all(n == 1 for u, n in tries.items() if u != first)


class RoundJournal:
    """A journal whose backlog is empty; while the first refill round asks it, a second PACS comes back."""

    def __init__(self, window_box: list, up: dict[str, bool]):
        self.box, self.up, self.asked = window_box, up, []

    def take_backlog(self, dest, before, limit):
        self.asked.append((dest, before))
        if len(self.asked) == 1:  # mid-round: b returns, and its return asks for a look (as the engine does)
            self.up["b"] = True
            self.box[0].poke(ahead=True)
        return []


def test_a_look_asked_for_during_a_dry_round_is_not_lost():
    """A round that found nothing proves the backlog dry only if no look was asked for meanwhile: a PACS that
    came back during it was not among those the round asked, and its files must not wait for the next sweep."""
    import time

    from relaypacsd.window import AHEAD

    up = {"a": True, "b": False}
    box: list[Window] = []
    journal = RoundJournal(box, up)
    window = Window(8, journal, lambda: dict(up), lambda page, ahead: None)
    box.append(window)
    window.start()  # at start it looks once (what the last run left)
    try:
        assert wait_until(lambda: any(d == "b" for d, _ in journal.asked), timeout=3)
        [before] = [t for d, t in journal.asked if d == "b"]
        assert before > time.time() + AHEAD / 2  # b's files go now, however far ahead their next try was
    finally:
        window.stop()
