"""The journal's contract: what the daemon and the commands rely on, run against every backend.

A new backend adds itself to BACKENDS and must pass this suite unchanged: SQLite in the state directory, and
PostgreSQL (the shared database of the gateways issue, #14) on a real private server (tests/localpostgres.py).
Only the interface of relaypacsd.journal is used here, never a backend's own storage.
"""

import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from relaypacsd.errors import LeaseLost
from relaypacsd.history import HistoryQuery, HistoryRecord
from relaypacsd.journal import JOURNAL_FILE, Ensure, FileFacts, Journal, Update
from relaypacsd.journal_sqlite import SqliteJournal


def _sqlite(request: Any, tmp_path: Path) -> Callable[..., Journal]:
    return lambda **options: SqliteJournal(tmp_path / "state" / JOURNAL_FILE, **options)


def _postgres(request: Any, tmp_path: Path) -> Callable[..., Journal]:
    from relaypacsd.journal_pg import PgJournal

    server = request.getfixturevalue("clean_postgres")  # a real server; FAILS under CI=true when missing
    return lambda **options: PgJournal(server.url, **options)


BACKENDS: dict[str, Callable[[Any, Path], Callable[..., Journal]]] = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=sorted(BACKENDS))
def opener(request, tmp_path):
    """Opens journals of one backend on one store (readonly=..., instance_days=...); closes them all after."""
    opened: list[Journal] = []
    backend = BACKENDS[request.param](request, tmp_path)

    def open_one(**options: Any) -> Journal:
        journal = backend(**options)
        opened.append(journal)
        return journal

    yield open_one
    for journal in reversed(opened):
        journal.close()


@pytest.fixture
def journal(opener):
    return opener()


def delivered(path, sop, digest, dest="orthanc"):
    return Update(path, dest, "delivered", "delivered", sop=sop, digest=digest)


def states(rows):
    return {dest: row.state for dest, row in rows.items()}


class TestRows:
    def test_ensure_creates_pending_rows_once_and_returns_them_all(self, journal):
        rows = journal.ensure("/s/sending/a.dcm", ["a", "b"], first_seen=5.0, sop="1.2.3")
        assert states(rows) == {"a": "pending", "b": "pending"}
        assert (rows["a"].attempts, rows["a"].first_seen, rows["a"].last_code) == (0, 5.0, None)
        journal.update("/s/sending/a.dcm", "a", state="delivered", event="delivered")
        assert states(journal.ensure("/s/sending/a.dcm", ["a", "b", "c"], sop="1.2.3")) == {
            "a": "delivered", "b": "pending", "c": "pending"}

    def test_ensure_drops_rows_another_instance_left_under_the_same_name(self, journal):
        """A modality reusing IMG0001.dcm: the old file's 'delivered' must never make the new one look sent."""
        journal.ensure("/s/sending/IMG.dcm", ["a"], sop="1.2.3")
        journal.update("/s/sending/IMG.dcm", "a", state="delivered", event="delivered")
        rows = journal.ensure("/s/sending/IMG.dcm", ["a"], sop="4.5.6")
        assert states(rows) == {"a": "pending"} and journal.sop_of("/s/sending/IMG.dcm") == "4.5.6"
        assert journal.history("/s/sending/IMG.dcm") == []

    def test_ensure_many_is_ensure_for_each_file_in_one_commit(self, journal):
        """Validation's group: each file's rows in order, as ensure gives them, with routes, keep and facts."""
        facts = FileFacts("1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.1", 10, "d" * 64, "P1", "A1", "CT")
        journal.ensure("/s/sending/old.dcm", ["a"], sop="9.9")
        journal.update("/s/sending/old.dcm", "a", state="delivered", event="delivered")
        journal.ensure("/s/sending/kept.dcm", ["a"], sop="3.3", route="r1", keep=True)
        got = journal.ensure_many([
            Ensure("/s/sending/new.dcm", ("a", "b"), first_seen=5.0, sop="1.1", facts=facts),
            Ensure("/s/sending/old.dcm", ("a",), sop="2.2"),  # another instance under the old name: rows dropped
            Ensure("/s/sending/kept.dcm", ("b",), sop="3.3", route="r2", keep=True),  # keeps its own rows
            Ensure("/s/sending/none.dcm", ()),
        ])
        assert [states(r) for r in got] == [{"a": "pending", "b": "pending"}, {"a": "pending"}, {"a": "pending"}, {}]
        assert got[0]["b"].first_seen == 5.0 and got[2]["a"].route == "r1"
        assert got == [journal.rows(p) for p in ("/s/sending/new.dcm", "/s/sending/old.dcm", "/s/sending/kept.dcm",
                                                 "/s/sending/none.dcm")]
        assert journal.ensure_many([]) == []

    def test_ensure_many_new_files_with_facts_twice_and_kept(self, journal):
        """New files with facts (one insert each in SQLite): rows as the journal reads them back, facts kept for
        the backlog, a path given twice ensured once, a kept file's second ensure adds nothing."""
        facts = FileFacts("1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.1", 10, "d" * 64, "P1", "A1", "CT")
        got = journal.ensure_many([
            Ensure("/s/sending/n1.dcm", ("a", "b", "a"), sop="1.1", facts=facts),
            Ensure("/s/sending/n2.dcm", ("a",), first_seen=7.0, sop="2.2", route="r1", keep=True, facts=facts,
                   backlog=True),
            Ensure("/s/sending/n2.dcm", ("b",), sop="2.2", route="r2", keep=True, facts=facts, backlog=True),
        ])
        assert got[:2] == [journal.rows("/s/sending/n1.dcm"), journal.rows("/s/sending/n2.dcm")]
        assert got[2] == got[1] and states(got[1]) == {"a": "pending"} and got[1]["a"].route == "r1"
        assert got[1]["a"].first_seen == 7.0 and states(got[0]) == {"a": "pending", "b": "pending"}
        assert journal.backlogged(["/s/sending/n1.dcm", "/s/sending/n2.dcm"]) == {"/s/sending/n2.dcm"}
        page = journal.take_backlog("a", float("inf"), 10)
        assert [(b.path, b.sop, b.facts) for b in page] == [("/s/sending/n2.dcm", "2.2", facts)]

    def test_forget_many_files_at_once(self, journal):
        paths = [f"/s/sending/{i}.dcm" for i in range(1100)]  # more than one statement's parameters
        journal.ensure_many([Ensure(p, ("a",), sop=f"1.{i}") for i, p in enumerate(paths)])
        journal.forget(*paths[:1050])
        of = journal.rows_of(paths)
        assert sum(1 for p in paths if of[p]) == 50 and of[paths[1049]] == {} and of[paths[1050]]

    def test_apply_records_each_state_with_a_history_line(self, journal):
        journal.ensure("/s/sending/a.dcm", ["a", "b"], sop="1.2.3")
        journal.apply([Update("/s/sending/a.dcm", "a", "waiting", "transient", "503 busy", 2, 99.5, 503),
                       Update("/s/sending/a.dcm", "b", "failed", "failed", "permanent: refused", 1, code=0xA900)])
        rows = journal.rows("/s/sending/a.dcm")
        assert (rows["a"].state, rows["a"].attempts, rows["a"].next_try, rows["a"].last_error, rows["a"].last_code) == (
            "waiting", 2, 99.5, "503 busy", 503)
        assert (rows["b"].state, rows["b"].last_code) == ("failed", 0xA900)
        journal.apply([Update("/s/sending/a.dcm", "a", "delivered", "delivered", "stored", code=200)])
        row = journal.rows("/s/sending/a.dcm")["a"]
        assert (row.state, row.attempts, row.last_error) == ("delivered", 2, "")  # attempts kept; no error once sent
        assert [(h["pacs"], h["event"]) for h in journal.history("/s/sending/a.dcm")] == [
            ("a", "transient"), ("b", "failed"), ("a", "delivered")]

    def test_rows_at_and_rows_of_read_many_files_at_once(self, journal):
        paths = [f"/s/sending/{i}.dcm" for i in range(1200)]  # a backend may split them into several queries
        for p in paths:
            journal.ensure(p, ["a", "b"])
        journal.apply([Update(p, "b", "delivered", "delivered") for p in paths[::2]])
        at_b = journal.rows_at("b", paths + ["/s/sending/none.dcm"])
        assert len(at_b) == 1200 and at_b[paths[0]].state == "delivered" and at_b[paths[1]].state == "pending"
        of = journal.rows_of(paths + ["/s/sending/none.dcm"])
        assert of["/s/sending/none.dcm"] == {} and states(of[paths[2]]) == {"a": "pending", "b": "delivered"}
        assert len(of) == 1201

    def test_history_is_oldest_first_with_utc_times(self, journal):
        journal.ensure("/s/sending/a.dcm", ["a"])
        for event in ("transient", "transient", "delivered"):
            journal.update("/s/sending/a.dcm", "a", state="waiting", event=event, detail=event)
        found = journal.history("/s/sending/a.dcm")
        assert [h["event"] for h in found] == ["transient", "transient", "delivered"]
        assert set(found[0]) == {"time", "pacs", "event", "detail"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", found[0]["time"])

    def test_counts_are_rows_per_destination_and_state(self, journal):
        for p in ("/s/sending/a.dcm", "/s/sending/b.dcm"):
            journal.ensure(p, ["a", "b"])
        journal.update("/s/sending/a.dcm", "a", state="waiting", event="transient")
        assert journal.counts() == {"a": {"pending": 1, "waiting": 1}, "b": {"pending": 2}}


class TestMoves:
    def test_rename_follows_the_file_and_drops_what_was_at_the_new_name(self, journal):
        journal.ensure("/s/failed/a.dcm", ["a"], sop="9.9")  # a file once there, now gone
        journal.update("/s/failed/a.dcm", "a", state="failed", event="failed")
        journal.ensure("/s/sending/a.dcm", ["a", "b"], sop="1.2.3")
        journal.update("/s/sending/a.dcm", "b", state="delivered", event="delivered")
        journal.rename("/s/sending/a.dcm", "/s/failed/a.dcm")
        assert journal.rows("/s/sending/a.dcm") == {} and journal.history("/s/sending/a.dcm") == []
        assert states(journal.rows("/s/failed/a.dcm")) == {"a": "pending", "b": "delivered"}
        assert journal.sop_of("/s/failed/a.dcm") == "1.2.3"
        assert [h["event"] for h in journal.history("/s/failed/a.dcm")] == ["delivered"]

    def test_a_copy_never_replaces_rows_of_a_file_at_the_new_name(self, journal):
        """The retry's look ("no rows there") and its copy used to be two steps: rows the daemon wrote between
        them were deleted by the copy."""
        journal.ensure("/s/failed/a.dcm", ["orthanc"], sop="1.2.3")
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="4.5.6")  # the daemon's claim, just now
        assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t1") is False
        assert journal.sop_of("/s/sending/a.dcm") == "4.5.6"
        assert journal.copy("/s/failed/a.dcm", "/s/sending/a~1.dcm", "t1") is True
        assert journal.sop_of("/s/sending/a~1.dcm") == "1.2.3"

    def test_uncopy_takes_back_only_the_rows_the_copy_wrote(self, journal):
        journal.ensure("/s/failed/a.dcm", ["orthanc"], sop="1.2.3")
        journal.update("/s/failed/a.dcm", "orthanc", state="failed", event="failed", detail="nope")
        assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t1")
        journal.uncopy("/s/sending/a.dcm", "t1")
        assert journal.rows("/s/sending/a.dcm") == {} and journal.history("/s/sending/a.dcm") == []
        assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t2")
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")  # the daemon adopted them: no longer the copy
        journal.update("/s/sending/a.dcm", "orthanc", state="delivered", event="delivered")
        journal.uncopy("/s/sending/a.dcm", "t2")
        assert journal.rows("/s/sending/a.dcm")["orthanc"].state == "delivered"
        assert journal.rows("/s/failed/a.dcm")["orthanc"].state == "failed"  # the original is never touched

    def test_forget_drops_the_rows_and_history_of_several_files(self, journal):
        for p in ("/s/sending/a.dcm", "/s/sending/b.dcm", "/s/sending/c.dcm"):
            journal.ensure(p, ["a"])
            journal.update(p, "a", state="delivered", event="delivered")
        journal.forget("/s/sending/a.dcm", "/s/sending/b.dcm")
        journal.forget()  # nothing to do
        assert journal.rows_of(["/s/sending/a.dcm", "/s/sending/b.dcm"]) == {
            "/s/sending/a.dcm": {}, "/s/sending/b.dcm": {}}
        assert journal.history("/s/sending/a.dcm") == [] and journal.rows("/s/sending/c.dcm")

    def test_paths_under_a_folder_and_the_sop_of_a_path(self, journal):
        journal.ensure("/s/sending/x/a.dcm", ["a", "b"], sop="1.2.3")
        journal.ensure("/s/sending/b.dcm", ["a"])
        journal.ensure("/s/sending2/c.dcm", ["a"], sop="7.7")  # a sibling folder is not beneath sending/
        assert sorted(journal.paths_under("/s/sending")) == ["/s/sending/b.dcm", "/s/sending/x/a.dcm"]
        assert journal.paths_under("/s/sending/") == journal.paths_under("/s/sending")
        assert journal.sop_of("/s/sending/x/a.dcm") == "1.2.3"
        assert journal.sop_of("/s/sending/b.dcm") == "" and journal.sop_of("/s/none.dcm") == ""

    def test_restore_writes_rows_back_without_counting_twice(self, journal):
        journal.set_health("orthanc", True)
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
        update = Update("/s/sending/a.dcm", "orthanc", "failed", "failed", "permanent: refused", 2, code=0xA900)
        journal.apply([update])
        journal.forget("/s/sending/a.dcm")
        journal.restore("/s/sending/a.dcm", "1.2.3", 5.0, [update])
        row = journal.rows("/s/sending/a.dcm")["orthanc"]
        assert (row.state, row.attempts, row.last_error, row.last_code, row.first_seen) == (
            "failed", 2, "permanent: refused", 0xA900, 5.0)
        assert journal.sop_of("/s/sending/a.dcm") == "1.2.3"
        assert journal.destinations()["orthanc"]["failed"] == 1
        assert "restored" in journal.history("/s/sending/a.dcm")[-1]["detail"]


    def test_paths_under_comes_in_pages_in_order(self, journal):
        """Start-up repair reads the rows of a million waiting files page by page, never all at once."""
        names = [f"/s/sending/{n}.dcm" for n in ("a", "b/c", "b/d", "e")]
        for name in reversed(names):
            journal.ensure(name, ["x", "y"])
        journal.ensure("/s/sending0/z.dcm", ["x"])  # sorts right after the folder's range
        assert journal.paths_under("/s/sending", limit=3) == names[:3]
        assert journal.paths_under("/s/sending", after=names[2], limit=3) == names[3:]
        assert journal.paths_under("/s/sending", after=names[3], limit=3) == []


FACTS = FileFacts(sop_class="1.2.840.10008.5.1.4.1.1.2", study="1.2.840.9", series="1.2.840.9.1", size=2082,
                  digest="ab" * 32, patient_id="P-1", accession="A-1", modality="CT")


def waiting(journal, path, dests=("orthanc",), sop="1.2.3", **kw):
    """A validated file left outside the active window: rows with facts, in the backlog."""
    return journal.ensure(path, list(dests), sop=sop, facts=kw.pop("facts", FACTS), backlog=True, **kw)


class TestBacklog:
    """What the engine needs to keep only an active window of files in memory (#14 item 7)."""

    def test_a_file_is_taken_from_the_backlog_once_with_its_facts_and_rows(self, journal):
        waiting(journal, "/s/sending/a.dcm", ("orthanc", "other"), first_seen=5.0)
        [taken] = journal.take_backlog("orthanc", time.time(), 10)
        assert (taken.path, taken.sop, taken.facts) == ("/s/sending/a.dcm", "1.2.3", FACTS)
        assert states(taken.rows) == {"orthanc": "pending", "other": "pending"}
        assert taken.rows["orthanc"].first_seen == 5.0
        assert journal.take_backlog("orthanc", time.time(), 10) == []
        assert journal.take_backlog("other", time.time(), 10) == []  # one file, one mark: taken for both

    def test_files_come_due_first_then_in_the_order_they_came_within_the_limit(self, journal):
        for n in ("c", "a", "d", "b"):
            waiting(journal, f"/s/sending/{n}.dcm")
        journal.apply([Update("/s/sending/d.dcm", "orthanc", "waiting", "transient", next_try=100.0),
                       Update("/s/sending/a.dcm", "orthanc", "waiting", "transient", next_try=time.time() + 3600)])
        page = journal.take_backlog("orthanc", time.time(), 2)
        assert [b.path for b in page] == ["/s/sending/c.dcm", "/s/sending/b.dcm"]  # never tried: next_try 0
        assert [b.path for b in journal.take_backlog("orthanc", time.time(), 10)] == ["/s/sending/d.dcm"]
        assert journal.take_backlog("orthanc", time.time(), 10) == []  # a.dcm is not due yet
        assert [b.path for b in journal.take_backlog("orthanc", time.time() + 7200, 10)] == ["/s/sending/a.dcm"]

    def test_only_files_still_owed_there_are_taken_and_counted(self, journal):
        waiting(journal, "/s/sending/a.dcm", ("orthanc", "other"))
        waiting(journal, "/s/sending/b.dcm", ("orthanc",))
        journal.apply([Update("/s/sending/a.dcm", "orthanc", "delivered", "delivered"),
                       Update("/s/sending/b.dcm", "orthanc", "failed", "failed")])
        assert journal.backlog_counts(["orthanc", "other", "none"]) == {"orthanc": 0, "other": 1, "none": 0}
        assert journal.backlogged(["/s/sending/a.dcm", "/s/sending/b.dcm", "/s/x.dcm"]) == {"/s/sending/a.dcm"}
        assert journal.take_backlog("orthanc", time.time(), 10) == []
        [taken] = journal.take_backlog("other", time.time(), 10)
        assert states(taken.rows) == {"orthanc": "delivered", "other": "pending"}

    def test_files_in_the_window_are_not_in_the_backlog_until_put_back(self, journal):
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3", facts=FACTS, backlog=False)
        waiting(journal, "/s/sending/b.dcm")
        assert journal.backlogged(["/s/sending/a.dcm", "/s/sending/b.dcm"]) == {"/s/sending/b.dcm"}
        assert journal.backlog_counts(["orthanc"]) == {"orthanc": 1}
        journal.to_backlog(["/s/sending/a.dcm"])
        journal.to_backlog([])
        assert journal.backlog_counts(["orthanc"]) == {"orthanc": 2}
        assert {b.path for b in journal.take_backlog("orthanc", time.time(), 10)} == {"/s/sending/a.dcm",
                                                                                      "/s/sending/b.dcm"}

    def test_ensure_of_a_file_again_places_it_and_updates_its_facts(self, journal):
        waiting(journal, "/s/sending/a.dcm", ("orthanc", "other"))
        newer = FileFacts(sop_class="1.2.840.10008.5.1.4.1.1.4", study="1.2.840.10", series="1.2.840.10.1", size=4000,
                          digest="cd" * 32)
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3", facts=newer, backlog=False)
        assert journal.backlogged(["/s/sending/a.dcm"]) == set()  # at the inactive PACS too: one mark per file
        journal.to_backlog(["/s/sending/a.dcm"])
        [taken] = journal.take_backlog("other", time.time(), 10)
        assert taken.facts == newer

    def test_a_taken_file_keeps_its_route_and_the_dashboard_counts_the_backlog_per_folder(self, journal):
        waiting(journal, "/s/sending/a.dcm", ("a", "b"), first_seen=7.0, route="mammo", keep=True)
        waiting(journal, "/s/sending/x/b.dcm", ("a",), sop="4.5.6", first_seen=5.0)
        waiting(journal, "/s/sending2/c.dcm", ("a",), sop="7.8.9", first_seen=1.0)  # another root
        journal.ensure("/s/sending/d.dcm", ["a"], sop="9.9", facts=FACTS, backlog=False, first_seen=0.5)  # held
        assert journal.backlog_under("/s/sending") == (2, 5.0)
        assert journal.backlog_under("/s/inbox") == (0, None)
        taken = {b.path: b for b in journal.take_backlog("a", time.time(), 10)}
        assert {r.route for r in taken["/s/sending/a.dcm"].rows.values()} == {"mammo"}

    def test_rows_without_facts_are_taken_as_such(self, journal):
        """Rows an older journal wrote know no study, size or digest: the file must be read again."""
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
        journal.to_backlog(["/s/sending/a.dcm"])
        [taken] = journal.take_backlog("orthanc", time.time(), 10)
        assert taken.facts is None and taken.sop == "1.2.3"

    def test_moved_or_forgotten_files_leave_the_backlog_and_a_copy_is_not_in_it(self, journal):
        waiting(journal, "/s/sending/a.dcm")
        waiting(journal, "/s/sending/b.dcm")
        journal.update("/s/sending/a.dcm", "orthanc", state="failed", event="failed")
        journal.rename("/s/sending/a.dcm", "/s/failed/a.dcm")
        journal.forget("/s/sending/b.dcm")
        assert journal.backlog_counts(["orthanc"]) == {"orthanc": 0}
        journal.reset_failed("/s/failed/a.dcm")
        assert journal.backlog_counts(["orthanc"]) == {"orthanc": 0}  # never taken from failed/
        assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t1")
        assert journal.backlogged(["/s/sending/a.dcm"]) == set()  # a retried file is validated again first


class TestRoutes:
    """Routing (#11): each row names the routes that gave the file that destination, and a file that has rows
    keeps its destinations when the routes change (a reload) or the daemon restarts."""

    def test_new_rows_carry_the_route_and_every_read_returns_it(self, journal):
        journal.ensure("/s/sending/a.dcm", ["a", "b"], sop="1.2.3", route="research,default")
        assert {r.route for r in journal.rows("/s/sending/a.dcm").values()} == {"research,default"}
        assert journal.rows_at("b", ["/s/sending/a.dcm"])["/s/sending/a.dcm"].route == "research,default"
        assert journal.rows_of(["/s/sending/a.dcm"])["/s/sending/a.dcm"]["a"].route == "research,default"
        journal.ensure("/s/sending/b.dcm", ["a"])
        assert journal.rows("/s/sending/b.dcm")["a"].route == ""  # no [[route]] configured

    def test_keep_gives_a_file_with_rows_no_new_destination(self, journal):
        rows = journal.ensure("/s/sending/a.dcm", ["a"], sop="1.2.3", route="mammo", keep=True)
        assert states(rows) == {"a": "pending"}
        journal.update("/s/sending/a.dcm", "a", state="delivered", event="delivered")
        rows = journal.ensure("/s/sending/a.dcm", ["b", "c"], sop="1.2.3", route="default", keep=True)
        assert states(rows) == {"a": "delivered"} and rows["a"].route == "mammo"
        # Without keep (no routes): every active destination, as before routing existed
        assert states(journal.ensure("/s/sending/a.dcm", ["a", "b"], sop="1.2.3")) == {"a": "delivered", "b": "pending"}

    def test_keep_routes_a_new_instance_under_a_reused_name_afresh(self, journal):
        """The old file's destinations are another file's: dropped first, then the new file's routes count."""
        journal.ensure("/s/sending/IMG.dcm", ["a"], sop="1.2.3", route="mammo", keep=True)
        rows = journal.ensure("/s/sending/IMG.dcm", ["b"], sop="4.5.6", route="default", keep=True)
        assert states(rows) == {"b": "pending"} and rows["b"].route == "default"

    def test_keep_with_no_destination_creates_nothing_and_returns_what_is_there(self, journal):
        assert journal.ensure("/s/sending/a.dcm", [], sop="1.2.3", keep=True) == {}
        journal.ensure("/s/sending/b.dcm", ["a"], sop="7.7", route="mammo", keep=True)
        assert states(journal.ensure("/s/sending/b.dcm", [], sop="7.7", keep=True)) == {"a": "pending"}

    def test_the_route_follows_the_file_through_moves_copies_and_restores(self, journal):
        journal.ensure("/s/sending/a.dcm", ["a"], sop="1.2.3", route="mammo")
        journal.rename("/s/sending/a.dcm", "/s/failed/a.dcm")
        assert journal.rows("/s/failed/a.dcm")["a"].route == "mammo"
        assert journal.copy("/s/failed/a.dcm", "/s/sending/a.dcm", "t1")
        assert journal.rows("/s/sending/a.dcm")["a"].route == "mammo"
        journal.forget("/s/sending/a.dcm")
        journal.restore("/s/sending/a.dcm", "1.2.3", 5.0, [Update("/s/sending/a.dcm", "a", "failed", "failed")],
                        route="mammo")
        assert journal.rows("/s/sending/a.dcm")["a"].route == "mammo"

    def test_route_counts_are_files_still_owed_per_route(self, opener):
        journal = opener()
        journal.ensure("/s/sending/a.dcm", ["a", "b"], route="mammo")
        journal.ensure("/s/sending/b.dcm", ["a"], route="mammo")
        journal.ensure("/s/sending/c.dcm", ["a"], route="default")
        journal.ensure("/s/sending/d.dcm", ["a"])
        journal.update("/s/sending/c.dcm", "a", state="delivered", event="delivered")
        assert journal.route_counts() == {"mammo": 2, "": 1}
        assert opener(readonly=True).route_counts() == {"mammo": 2, "": 1}


class TestRetry:
    def test_reset_failed_puts_only_failed_rows_back_to_pending(self, journal):
        key = "/s/failed/a.dcm"
        journal.ensure(key, ["a", "b"], first_seen=5.0, sop="1.2.3")
        journal.apply([Update(key, "a", "failed", "failed", "permanent: refused", 3, 50.0, 400),
                       Update(key, "b", "delivered", "delivered")])
        assert journal.reset_failed(key) == ["a"]
        rows = journal.rows(key)
        assert (rows["a"].state, rows["a"].attempts, rows["a"].next_try, rows["a"].last_error, rows["a"].last_code) == (
            "pending", 0, 0.0, "", None)
        assert rows["b"].state == "delivered"  # a PACS that confirmed the file never gets it again
        assert rows["a"].first_seen > 5.0  # a fresh age: too-old limits count from the retry
        last = journal.history(key)[-1]
        assert (last["pacs"], last["event"], last["detail"]) == ("a", "retry", "operator retry")
        assert journal.reset_failed(key) == []

    def test_a_retry_forgets_the_earlier_version_only_where_the_file_had_a_uid_conflict(self, journal):
        for dest in ("a", "b", "c"):
            journal.apply([delivered("/s/sending/first.dcm", "1.2.3", "old", dest)])
        key = "/s/failed/b.dcm"
        journal.ensure(key, ["a", "b", "c"], sop="1.2.3")
        journal.apply([Update(key, "a", "failed", "uid_conflict", "uid_conflict: earlier"),
                       Update(key, "b", "failed", "failed", "permanent: refused"),
                       Update(key, "c", "delivered", "delivered")])
        assert journal.conflicted(key) == {"a"}
        assert sorted(journal.reset_failed(key)) == ["a", "b"]
        assert {d for d in ("a", "b", "c") if journal.known_instances(d, ["1.2.3"])} == {"b", "c"}
        assert journal.conflicted(key) == set()  # the retry is now its last word


class TestInstances:
    def test_a_confirmed_instance_is_remembered_after_its_rows_are_forgotten(self, journal):
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
        journal.apply([delivered("/s/sending/a.dcm", "1.2.3", "aaa")])
        journal.forget("/s/sending/a.dcm")  # the file reached sent/
        known = journal.known_instances("orthanc", ["1.2.3", "9.9"])
        assert set(known) == {"1.2.3"} and known["1.2.3"].digest == "aaa"
        assert known["1.2.3"].path == "/s/sending/a.dcm" and known["1.2.3"].time > time.time() - 60
        assert journal.known_instances("other", ["1.2.3"]) == {}  # per destination

    def test_a_later_confirmation_replaces_the_remembered_one(self, journal):
        journal.apply([delivered("/s/sending/a.dcm", "1.2.3", "aaa")])
        journal.apply([delivered("/s/sending/b.dcm", "1.2.3", "bbb")])
        known = journal.known_instances("orthanc", ["1.2.3"])["1.2.3"]
        assert (known.digest, known.path) == ("bbb", "/s/sending/b.dcm")

    def test_remember_keeps_what_a_pacs_confirmed_without_moving_any_row(self, journal):
        """The file changed meanwhile: its rows are another version's now."""
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
        journal.remember([delivered("/s/sending/a.dcm", "1.2.3", "aaa")])
        assert journal.known_instances("orthanc", ["1.2.3"])["1.2.3"].digest == "aaa"
        assert states(journal.rows("/s/sending/a.dcm")) == {"orthanc": "pending"}
        assert journal.history("/s/sending/a.dcm") == [] and journal.destinations() == {}

    def test_instances_older_than_the_memory_are_pruned(self, opener, monkeypatch):
        journal = opener(instance_days=1)
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: 1_000_000.0)  # the journal keeps the daemon's clock
            journal.apply([delivered(f"/s/{i}", f"1.{i}", "x") for i in range(3)])
        journal.apply([delivered("/s/new", "2.0", "y")])
        assert journal.prune_instances(limit=2) == 2
        assert journal.prune_instances() == 1 and journal.prune_instances() == 0
        assert set(journal.known_instances("orthanc", ["1.0", "1.1", "1.2", "2.0"])) == {"2.0"}

    def test_known_instances_answers_for_many_uids_at_once(self, journal):
        journal.apply([delivered(f"/s/{i}", f"1.{i}", "x") for i in range(1200)])
        assert len(journal.known_instances("orthanc", [f"1.{i}" for i in range(1300)])) == 1200


class TestDestinations:
    def test_begin_run_makes_every_health_unknown_and_keeps_the_counters(self, journal):
        journal.set_health("old", False, "unreachable")
        journal.ensure("/s/sending/a.dcm", ["a"])
        journal.update("/s/sending/a.dcm", "a", state="delivered", event="delivered")
        journal.begin_run(["a", "b"])
        found = journal.destinations()
        assert {d: v["healthy"] for d, v in found.items()} == {"old": None, "a": None, "b": None}
        assert found["a"]["delivered"] == 1 and found["b"]["delivered"] == 0
        assert found["old"]["last_error"] == "unreachable"

    def test_set_health_keeps_the_last_error_when_none_is_given(self, journal):
        journal.set_health("a", False, "PACS 'a' unreachable")
        before = journal.destinations()["a"]
        assert (before["healthy"], before["last_error"]) == (False, "PACS 'a' unreachable")
        journal.set_health("a", True)
        after = journal.destinations()["a"]
        assert (after["healthy"], after["last_error"]) == (True, "PACS 'a' unreachable")
        assert after["last_change"] >= before["last_change"] > time.time() - 60 and after["last_success"] is None

    def test_counters_start_with_the_first_delivery_and_never_lift_a_down(self, journal):
        """A delivery is evidence of health for an unknown destination; a DOWN one stays down (the probe decides)."""
        journal.ensure("/s/sending/a.dcm", ["a", "b"])
        journal.apply([Update("/s/sending/a.dcm", "a", "delivered", "delivered")])
        a = journal.destinations()["a"]
        assert (a["healthy"], a["delivered"], a["failed"], a["conflicts"]) == (True, 1, 0, 0)
        assert a["last_success"] is not None and a["last_success"] > time.time() - 60
        journal.set_health("b", False, "down")
        journal.apply([Update("/s/sending/a.dcm", "b", "delivered", "delivered")])
        b = journal.destinations()["b"]
        assert (b["healthy"], b["delivered"]) == (False, 1)

    def test_a_failure_is_counted_and_says_nothing_about_health(self, journal):
        journal.ensure("/s/sending/a.dcm", ["a"])
        journal.apply([Update("/s/sending/a.dcm", "a", "failed", "failed", "permanent: refused")])
        a = journal.destinations()["a"]
        assert (a["healthy"], a["failed"], a["delivered"], a["last_success"]) == (None, 1, 0, None)

    def test_a_uid_conflict_is_counted_from_the_first_one_on_like_deliveries_and_failures(self, journal):
        """The counters' row is created by the first update that counts: the conflict must not come before it."""
        journal.ensure("/s/sending/a.dcm", ["orthanc"], sop="1.2.3")
        journal.apply([Update("/s/sending/a.dcm", "orthanc", "failed", "uid_conflict", "uid_conflict: earlier")])
        assert {d: (v["failed"], v["conflicts"]) for d, v in journal.destinations().items()} == {"orthanc": (1, 1)}

    def test_a_read_only_journal_sees_what_the_daemon_writes(self, opener):
        """`status` reads while the daemon runs."""
        daemon = opener()
        daemon.ensure("/s/sending/a.dcm", ["a"])
        daemon.set_health("a", True)
        looking = opener(readonly=True)
        assert looking.counts() == {"a": {"pending": 1}} and looking.destinations()["a"]["healthy"] is True
        daemon.update("/s/sending/a.dcm", "a", state="delivered", event="delivered")
        assert looking.counts() == {"a": {"delivered": 1}} and looking.destinations()["a"]["delivered"] == 1


class TestNodes:
    """Several gateways on one journal (#14): leases, takeover, and which node owns which file."""

    def test_a_node_joins_beats_and_a_new_incarnation_fences_the_old_one_out(self, opener):
        journal = opener()
        assert journal.node("a") is None and journal.join("a", "host-a", 11, 0) == 1
        assert journal.join("a", "host-a", 12, 0) is None  # joined meanwhile: the caller looks again
        assert journal.beat("a", 1, {"orthanc": {"healthy": True, "reason": ""}})
        state = journal.node("a")
        assert (state.host, state.pid, state.epoch, state.stopped, state.taken_by, state.files) == ("host-a", 11, 1, False, "", 0)
        assert state.health == {"orthanc": {"healthy": True, "reason": ""}} and state.silent < 5
        assert abs(journal.clock() - time.time()) < 5 and abs(state.heartbeat - journal.clock()) < 5
        assert journal.join("a", "host-a", 12, 1) == 2
        assert not journal.beat("a", 1, {}) and journal.beat("a", 2, {})
        assert [n.name for n in opener().nodes()] == ["a"]

    def test_the_journal_has_one_identity_whoever_opens_it(self, opener):
        first = opener().identity
        assert first and opener().identity == first and opener(readonly=True).identity == first

    def test_only_one_node_may_claim_a_file_from_the_inbox(self, opener):
        """On a share a claim is link + unlink: two nodes could both 'win' one file. The reservation decides."""
        a, b = opener(), opener()
        a.join("a", "h", 1, 0)
        time.sleep(0.02)  # b's heartbeat the later: a's files must not be counted as b's (a race seen in CI)
        b.join("b", "h", 2, 0)
        assert a.reserve("a", 1, ["ct/inbox/1", "ct/inbox/2"], 30) == {"ct/inbox/1", "ct/inbox/2"}
        assert b.reserve("b", 1, ["ct/inbox/2", "ct/inbox/3"], 30) == {"ct/inbox/3"}
        assert a.reserve("a", 1, ["ct/inbox/1"], 30) == {"ct/inbox/1"}  # its own again
        a.claimed("a", ["ct/inbox/1", "ct/inbox/2"], ["ct/sending/1"])
        assert b.reserve("b", 1, ["ct/inbox/2"], 30) == {"ct/inbox/2"}  # a let it go
        assert b.owners(["ct/sending/1", "ct/sending/9"]) == {"ct/sending/1": "a"}
        assert a.node("a").files == 1

    def test_a_reservation_older_than_the_lease_is_anyones(self, opener):
        a, b = opener(), opener()
        a.join("a", "h", 1, 0)
        b.join("b", "h", 2, 0)
        a.reserve("a", 1, ["ct/inbox/1"], 30)
        time.sleep(0.3)
        assert b.reserve("b", 1, ["ct/inbox/1"], 0.2) == {"ct/inbox/1"}

    def test_a_silent_node_is_taken_over_with_its_files_and_fenced_out(self, opener):
        a, b = opener(), opener()
        a.join("a", "h", 1, 0)
        b.join("b", "h", 2, 0)
        b.claimed("b", [], ["ct/sending/1", "ct/sending/2"])
        b.reserve("b", 1, ["ct/inbox/3"], 30)
        b.ensure("ct/sending/1", ["orthanc"], sop="1.2.3")
        b.fence("b", 1)
        assert a.take_over("a", 1, 30) == {}  # b beats within its lease
        time.sleep(0.5)
        a.beat("a", 1, {})
        assert a.take_over("a", 1, 0.4) == {"b": 2}
        assert a.take_over("a", 1, 0.4) == {}  # once
        assert a.owners(["ct/sending/1", "ct/sending/2"]) == {"ct/sending/1": "a", "ct/sending/2": "a"}
        assert a.reserve("a", 1, ["ct/inbox/3"], 30) == {"ct/inbox/3"}  # its reservations went with it
        state = a.node("b")
        assert (state.taken_by, state.epoch, state.files) == ("a", 2, 0)
        assert not b.beat("b", 1, {})  # it learns it lost its lease
        with pytest.raises(LeaseLost):  # and an answer it records now changes nothing
            b.apply([Update("ct/sending/1", "orthanc", "failed", "failed", "late")])
        assert a.rows("ct/sending/1")["orthanc"].state == "pending" and a.history("ct/sending/1") == []
        assert b.join("b", "h", 2, state.epoch) == 3 and a.node("b").taken_by == ""  # back, with nothing

    def test_a_node_that_said_goodbye_is_taken_over_at_once_and_a_taken_node_by_one_only(self, opener):
        a, b, c = opener(), opener(), opener()
        for journal, name in ((a, "a"), (b, "b"), (c, "c")):
            journal.join(name, "h", 1, 0)
        b.claimed("b", [], ["ct/sending/1"])
        b.leave("b", 1)
        assert a.node("b").stopped
        assert a.take_over("a", 1, 30) == {"b": 1}
        assert c.take_over("c", 1, 30) == {}
        assert c.owners(["ct/sending/1"]) == {"ct/sending/1": "a"}

    def test_a_taker_fenced_out_itself_takes_nothing(self, opener):
        a, b = opener(), opener()
        a.join("a", "h", 1, 0)
        b.join("b", "h", 2, 0)
        b.leave("b", 1)
        a.join("a", "h", 1, 1)  # another process took this node's name: epoch 2
        with pytest.raises(LeaseLost):
            a.take_over("a", 1, 30)
        assert a.node("b").taken_by == ""

    def test_files_nobody_owns_become_a_nodes_own_after_two_looks_a_grace_apart(self, opener):
        a, b = opener(), opener()
        a.join("a", "h", 1, 0)
        b.join("b", "h", 2, 0)
        a.claimed("a", [], ["ct/sending/mine"])
        assert a.adopt("a", 1, ["ct/sending/x", "ct/sending/mine"], 0.3) == []
        assert b.adopt("b", 1, ["ct/sending/x"], 0.3) == []
        time.sleep(0.4)
        assert sorted(a.adopt("a", 1, ["ct/sending/x", "ct/sending/mine"], 0.3)) == ["ct/sending/x"]
        assert b.adopt("b", 1, ["ct/sending/x"], 0.3) == []
        assert a.owners(["ct/sending/x", "ct/sending/mine"]) == {"ct/sending/x": "a", "ct/sending/mine": "a"}
        assert a.adopt("a", 1, ["ct/sending/y"], 0) == ["ct/sending/y"]  # no grace (one gateway): at once

    def test_a_file_leaving_sending_is_nobodys_and_ensure_owns_what_nobody_does(self, opener):
        a, b = opener(), opener()
        a.join("a", "h", 1, 0)
        b.join("b", "h", 2, 0)
        a.fence("a", 1)
        b.fence("b", 1)
        a.ensure("ct/sending/zip/1.dcm", ["orthanc"], sop="1.1")  # a zip's member: never claimed
        b.claimed("b", [], ["ct/sending/2.dcm"])
        a.ensure("ct/sending/2.dcm", ["orthanc"], sop="2.2")  # b's: ensure never takes it
        # Alone on its spool (SQLite, not shared) a node owns every file: ensure need not say so.
        zipped = {"ct/sending/zip/1.dcm": "a"} if a.shared else {}
        assert a.owners(["ct/sending/zip/1.dcm", "ct/sending/2.dcm"]) == {**zipped, "ct/sending/2.dcm": "b"}
        a.rename("ct/sending/zip/1.dcm", "ct/failed/zip/1.dcm")
        b.forget("ct/sending/2.dcm")
        assert a.owners(["ct/sending/zip/1.dcm", "ct/failed/zip/1.dcm", "ct/sending/2.dcm"]) == {}
        assert a.node("a").files == 0

    def test_a_node_takes_from_the_backlog_only_its_own_files_and_a_taker_those_of_the_dead(self, opener):
        """Each file sent once per PACS by one node (#14): a node's window takes in only what it owns."""
        a, b = opener(), opener()
        a.join("a", "h", 1, 0)
        b.join("b", "h", 2, 0)
        a.fence("a", 1)
        b.fence("b", 1)
        a.claimed("a", [], ["ct/sending/a1.dcm"])
        b.claimed("b", [], ["ct/sending/b1.dcm", "ct/sending/b2.dcm"])
        waiting(a, "ct/sending/a1.dcm", sop="1.1")
        waiting(b, "ct/sending/b1.dcm", sop="2.1")
        waiting(b, "ct/sending/b2.dcm", sop="2.2")
        everything = {"ct/sending/a1.dcm", "ct/sending/b1.dcm", "ct/sending/b2.dcm"}
        # Any node's untracked scan must leave a file in anyone's backlog alone.
        assert a.backlogged(sorted(everything)) == everything
        if not a.shared:  # alone on its spool (SQLite) a node owns every file
            assert {t.path for t in a.take_backlog("orthanc", time.time(), 10)} == everything
            return
        assert a.backlog_counts(["orthanc"]) == {"orthanc": 1} and b.backlog_counts(["orthanc"]) == {"orthanc": 2}
        assert a.backlog_under("ct/sending") == (1, a.rows("ct/sending/a1.dcm")["orthanc"].first_seen)
        assert [t.path for t in a.take_backlog("orthanc", time.time(), 10)] == ["ct/sending/a1.dcm"]
        assert [t.path for t in b.take_backlog("orthanc", time.time(), 1)] == ["ct/sending/b1.dcm"]
        time.sleep(0.5)  # b falls silent with b2 in its backlog
        a.beat("a", 1, {})
        assert a.take_over("a", 1, 0.4) == {"b": 2}
        assert a.backlog_counts(["orthanc"]) == {"orthanc": 1}
        with pytest.raises(LeaseLost):  # b, fenced out, takes nothing and marks nothing
            b.take_backlog("orthanc", time.time(), 10)
        with pytest.raises(LeaseLost):
            b.to_backlog(["ct/sending/b1.dcm"])
        assert [t.path for t in a.take_backlog("orthanc", time.time(), 10)] == ["ct/sending/b2.dcm"]
        assert a.backlogged(sorted(everything)) == set()


def record(t=1000.0, **fields: Any) -> HistoryRecord:
    """A history record at time `t`, its fields those given and a plain delivery's otherwise."""
    base: dict[str, Any] = dict(watch="/srv/ct", file="CT1/IM1.dcm", sop_instance_uid="1.2.3.1",
                                sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid="1.2.3.9",
                                study_instance_uid="1.2.3", patient_id="P1", accession_number="A1", modality="CT",
                                route="", destination="orthanc", outcome="delivered", status_code=200,
                                reason="delivered (HTTP 200): stored", bytes=39000, attempt=1, duration_ms=12.5,
                                user="")
    return HistoryRecord(t, **{**base, **fields})


class TestHistory:
    def test_records_come_back_whole_newest_first_with_ties_in_the_order_written(self, journal):
        a, b, c = record(10.0, file="a"), record(20.0, file="b"), record(20.0, file="c", status_code=None,
                                                                       duration_ms=None, user="alice")
        journal.record_history([a, b])
        journal.record_history([c])
        assert journal.find_history(HistoryQuery()) == [c, b, a]

    def test_the_default_is_the_newest_fifty_and_zero_means_every_match(self, journal):
        journal.record_history([record(float(i), file=str(i)) for i in range(60)])
        newest = journal.find_history(HistoryQuery())
        assert [r.file for r in newest] == [str(i) for i in range(59, 9, -1)]
        assert len(journal.find_history(HistoryQuery(limit=0))) == 60
        assert [r.file for r in journal.find_history(HistoryQuery(limit=2))] == ["59", "58"]

    def test_every_filter_given_must_match(self, journal):
        journal.record_history([
            record(1.0, study_instance_uid="9.1", file="s"), record(2.0, patient_id="P9", file="p"),
            record(3.0, accession_number="A9", file="a"), record(4.0, sop_instance_uid="9.2", file="o"),
            record(5.0, file="CT2/x.dcm"), record(6.0, destination="other", file="d"),
            record(7.0, outcome="failed", file="f"), record(8.0, file="plain")])
        only = {"study": "9.1", "patient": "P9", "accession": "A9", "sop": "9.2", "file": "CT2/x.dcm",
                "pacs": "other", "outcome": "failed"}
        for name, value in only.items():
            assert len(journal.find_history(HistoryQuery(**{name: value}))) == 1, name
        assert journal.find_history(HistoryQuery(pacs="other", outcome="failed")) == []
        assert len(journal.find_history(HistoryQuery(pacs="orthanc", outcome="delivered", patient="P1"))) == 5
        assert len(journal.find_history(HistoryQuery(study="", pacs=None))) == 8  # '' and None match anything

    def test_since_and_until_bound_the_time_both_included(self, journal):
        journal.record_history([record(float(t), file=str(t)) for t in range(10)])
        found = journal.find_history(HistoryQuery(since=3.0, until=5.0))
        assert [r.file for r in found] == ["5", "4", "3"]

    def test_apply_writes_each_updates_record_with_its_answer(self, journal):
        journal.ensure("/s/sending/a.dcm", ["a", "b"], sop="1.2.3.1")
        journal.apply([Update("/s/sending/a.dcm", "a", "delivered", "delivered", record=record(5.0)),
                       Update("/s/sending/a.dcm", "b", "waiting", "transient", "503", 1, 99.0,
                              record=record(5.0, destination="b", outcome="waiting", status_code=503)),
                       Update("/s/sending/a.dcm", "c", "failed", "failed")])  # no record: none written
        assert [(r.destination, r.outcome) for r in journal.find_history(HistoryQuery())] == [
            ("b", "waiting"), ("orthanc", "delivered")]
        journal.forget("/s/sending/a.dcm")  # the file reached sent/: its rows go, its history stays
        assert len(journal.find_history(HistoryQuery(sop="1.2.3.1"))) == 2

    def test_remember_writes_the_records_of_what_it_remembers(self, journal):
        journal.remember([Update("/s/sending/a.dcm", "orthanc", "delivered", "delivered", sop="1.2.3.1", digest="x",
                                 record=record(5.0))])
        assert journal.find_history(HistoryQuery()) == [record(5.0)]

    def test_pruning_drops_the_oldest_records_before_a_time_in_steps(self, journal):
        journal.record_history([record(float(t), file=str(t)) for t in range(10)])
        assert journal.prune_history(before=6.0, limit=4) == 4
        assert journal.prune_history(before=6.0, limit=4) == 2
        assert journal.prune_history(before=6.0, limit=4) == 0
        assert [r.file for r in journal.find_history(HistoryQuery())] == ["9", "8", "7", "6"]

    def test_a_read_only_journal_finds_what_the_daemon_records(self, opener):
        daemon = opener()
        looking = opener(readonly=True)
        daemon.record_history([record(5.0)])
        assert looking.find_history(HistoryQuery(study="1.2.3")) == [record(5.0)]
