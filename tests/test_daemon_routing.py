"""Routing in the daemon (#11), against scripted PACS: each file reaches exactly its route's PACS; an unmatched
file fails at stage routing and a retry routes it again; a reload's routes apply to files claimed after it."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from relaypacsd import requeue
from relaypacsd.config import build_config
from relaypacsd.daemon import Daemon
from relaypacsd.errors import PacsUnreachable
from relaypacsd.outcomes import Outcome
from tests.dicomfactory import write_tagged
from tests.helpers import ScriptedPacs, count, wait_until

MAMMO = {"name": "mammo", "match": {"Modality": ["MG", "DBT"]}, "to": ["breast"]}
DEFAULT = {"name": "default", "to": ["main"]}


def routed_config(tmp_path: Path, routes: list[dict], **delivery):
    return build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                         "watch": [{"path": str(tmp_path / "root"), "settle_seconds": 0.1, "rescan_interval": 3600}],
                         "delivery": {"retry_delay": 0.01, "retry_sweep_interval": 0.2, **delivery},
                         "pacs": {"main": {"url": "http://main.test"}, "breast": {"url": "http://breast.test"}},
                         "route": routes}, {})


def make(tmp_path: Path, routes: list[dict], **delivery) -> tuple[Daemon, ScriptedPacs, ScriptedPacs]:
    """A daemon whose senders are the active PACS, as the daemon builds them (none with forwarding off)."""
    main, breast = ScriptedPacs("main"), ScriptedPacs("breast")
    config = routed_config(tmp_path, routes, **delivery)
    senders = {p.name: {"main": main, "breast": breast}[p.name] for p in config.active()} if config.delivery.enabled \
        else {}
    return Daemon(config, senders=senders), main, breast


def drop(daemon: Daemon, name: str, modality: str, **attrs: str) -> str:
    """Write a file beside the inbox, then rename it in (complete at once); its SOPInstanceUID."""
    staging = daemon.spools[0].root / "staging" / name
    sop = write_tagged(staging, modality, **attrs)
    target = daemon.spools[0].inbox / name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return sop


def sidecar(daemon: Daemon, name: str) -> dict:
    return json.loads((daemon.spools[0].failed / f"{name}.error.json").read_text())


def test_each_file_goes_only_to_its_routes_pacs_and_the_log_names_the_route(tmp_path):
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT])
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    daemon.start()
    try:
        ct = drop(daemon, "ct.dcm", "CT")
        mg = drop(daemon, "mg.dcm", "MG")
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 2)
    finally:
        daemon.shutdown(timeout=5)
        logger.remove(sink)
    assert (main.received(ct), main.received(mg), breast.received(ct), breast.received(mg)) == (1, 0, 0, 1)
    assert any("PACS forward breast delivered" in line and "routes=mammo" in line for line in lines), lines
    assert any("routing: 2 route(s)" in line and "mammo -> breast; default -> main" in line for line in lines)


def test_an_unmatched_file_fails_at_stage_routing_and_a_retry_routes_it_by_the_new_routes(tmp_path, monkeypatch):
    daemon, main, breast = make(tmp_path, [MAMMO])
    daemon.start()
    try:
        sop = drop(daemon, "ct.dcm", "CT")
        assert wait_until(lambda: count(daemon.spools[0], "failed") == 1)
        why = sidecar(daemon, "ct.dcm")
        assert why["stage"] == "routing" and why["sop_instance_uid"] == sop
        assert why["reason"] == 'no route matches this file (mammo: Modality is "CT", not one of "MG", "DBT")'
        assert why["routes"] == [{"route": "mammo", "matched": False,
                                  "failed": 'Modality is "CT", not one of "MG", "DBT"'}]
        # The counter moves just after the file lands in failed/: wait for it rather than race it.
        assert "relaypacsd retry FILE" in why["next_step"] and wait_until(lambda: daemon.counters["failed"] == 1)
        assert main.calls == breast.calls == []
        # The operator adds a default route and reloads; the retry routes the file again
        fixed = routed_config(tmp_path, [MAMMO, DEFAULT])
        monkeypatch.setattr("relaypacsd.reload.load_config", lambda source: fixed)
        assert daemon.reload()
        requeue.requeue(daemon.spools[0], daemon.journal, daemon.spools[0].failed / "ct.dcm")
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 1)
    finally:
        daemon.shutdown(timeout=5)
    assert main.received(sop) == 1 and breast.received(sop) == 0


def test_a_reload_applies_new_routes_to_files_claimed_after_it_only(tmp_path, monkeypatch):
    """A file waiting in sending/ for the breast PACS keeps it; one claimed after the reload goes by the new route."""
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT])
    breast.rule = lambda uid, n, call: Outcome.DELIVERED if call > 3 else Outcome.TRANSIENT
    daemon.start()
    try:
        waiting = drop(daemon, "before.dcm", "MG")
        assert wait_until(lambda: len(breast.calls) >= 1)
        assert daemon.journal.rows(str(daemon.spools[0].sending / "before.dcm"))["breast"].route == "mammo"
        moved = routed_config(tmp_path, [{**MAMMO, "to": ["main"]}, DEFAULT])
        monkeypatch.setattr("relaypacsd.reload.load_config", lambda source: moved)
        assert daemon.reload()
        after = drop(daemon, "after.dcm", "MG")
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 2, timeout=20)
    finally:
        daemon.shutdown(timeout=5)
    assert (breast.received(waiting) >= 1, main.received(waiting)) == (True, 0)
    assert (main.received(after), breast.received(after)) == (1, 0)


def test_a_file_whose_route_names_only_inactive_pacs_fails_clearly(tmp_path):
    """ACTIVE_PACS leaves the breast PACS out: the mammo file must not wait silently in sending/."""
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT], active_pacs=["main"])
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    daemon.start()
    try:
        drop(daemon, "mg.dcm", "MG")
        drop(daemon, "ct.dcm", "CT")
        assert wait_until(lambda: count(daemon.spools[0], "failed") == 1 and count(daemon.spools[0], "sent") == 1)
    finally:
        daemon.shutdown(timeout=5)
        logger.remove(sink)
    why = sidecar(daemon, "mg.dcm")
    assert why["stage"] == "routing" and why["route"] == "mammo"
    assert why["reason"] == ("route mammo sends this file to breast, none of them active "
                             "(ACTIVE_PACS / delivery.active_pacs)")
    assert any("route mammo: breast not active" in line for line in lines), lines  # said once, at start
    assert sum("route mammo: breast not active" in line for line in lines) == 1


def test_a_delivery_failure_sidecar_names_the_route(tmp_path):
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT])
    breast.rule = lambda uid, n, call: Outcome.PERMANENT
    daemon.start()
    try:
        drop(daemon, "mg.dcm", "MG")
        assert wait_until(lambda: count(daemon.spools[0], "failed") == 1)
    finally:
        daemon.shutdown(timeout=5)
    why = sidecar(daemon, "mg.dcm")
    assert why["stage"] == "delivery" and why["route"] == "mammo" and set(why["pacs"]) == {"breast"}


def test_a_file_that_reaches_sent_needs_only_its_routes_pacs(tmp_path):
    """Not every active PACS: the CT file is settled once main confirmed it, breast never owed it."""
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT])
    daemon.start()
    try:
        drop(daemon, "a/ct.dcm", "CT", StudyDescription="Thorax für Kinder")
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 1)
    finally:
        daemon.shutdown(timeout=5)
    assert breast.calls == [] and len(main.calls) == 1


def test_with_forwarding_off_routed_files_wait_in_sending(tmp_path):
    """PACS_ENABLED=false: validated and parked, as without routes, matched or not: routed once forwarding is on."""
    daemon, main, breast = make(tmp_path, [MAMMO], enabled=False)
    daemon.start()
    try:
        drop(daemon, "mg.dcm", "MG")
        drop(daemon, "ct.dcm", "CT")
        assert wait_until(lambda: daemon.engine.in_flight() == 2)
    finally:
        daemon.shutdown(timeout=5)
    assert count(daemon.spools[0], "sending") == 2 and count(daemon.spools[0], "failed") == 0


def test_a_file_kept_for_pacs_no_longer_active_fails_with_its_rows(tmp_path, monkeypatch):
    """A reload takes the breast PACS out of ACTIVE_PACS while a mammo file waits for it: failed/, stage routing,
    and its rows follow it, so a retry (once breast is active again) still knows where it was going."""
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT])
    breast.rule = lambda uid, n, call: Outcome.TRANSIENT
    daemon.start()
    try:
        drop(daemon, "mg.dcm", "MG")
        assert wait_until(lambda: len(breast.calls) >= 1)
        narrowed = routed_config(tmp_path, [MAMMO, DEFAULT], active_pacs=["main"])
        monkeypatch.setattr("relaypacsd.reload.load_config", lambda source: narrowed)
        daemon._senders = {"main": main}
        assert daemon.reload()
        key = str(daemon.spools[0].failed / "mg.dcm")
        assert wait_until(lambda: count(daemon.spools[0], "failed") == 1 and daemon.journal.rows(key))  # moved, then
        rows = daemon.journal.rows(key)  # its rows follow
    finally:
        daemon.shutdown(timeout=5)
    why = sidecar(daemon, "mg.dcm")
    assert why["stage"] == "routing" and "was given breast (route mammo) before" in why["reason"]
    assert why["route"] == "mammo"  # the route it went by, not what the new routes would say
    assert set(rows) == {"breast"} and rows["breast"].route == "mammo" and main.calls == []


def test_a_file_given_every_pacs_before_routes_existed_keeps_them(tmp_path):
    """Rows made without [[route]] tables (route ''): the file keeps every PACS it was given, and no route name."""
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT])
    spool = daemon.spools[0]
    spool.prepare()
    sop = write_tagged(spool.sending / "ct.dcm", "CT")
    daemon.journal.ensure(str(spool.sending / "ct.dcm"), ["main", "breast"], sop=sop)  # an earlier run's rows
    finished = []
    daemon.engine.on_finished = lambda item, folder: finished.append((item.route, folder))
    daemon.start()
    try:
        assert wait_until(lambda: count(spool, "sent") == 1)
    finally:
        daemon.shutdown(timeout=5)
    assert (main.received(sop), breast.received(sop)) == (1, 1) and finished == [("", "sent")]


def test_the_history_names_the_route_of_each_delivery_and_an_unmatched_files_refusal(tmp_path):
    """#12: the route is in each record; a routing refusal is a record without a PACS, with what the walk read."""
    from relaypacsd.history import HistoryQuery

    daemon, main, breast = make(tmp_path, [MAMMO])
    daemon.start()
    try:
        mg = drop(daemon, "mg.dcm", "MG")
        ct = drop(daemon, "ct.dcm", "CT")
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 1 and count(daemon.spools[0], "failed") == 1)
        # The refusal's record is written just after its move to failed/: wait for it rather than race it.
        assert wait_until(lambda: {mg, ct} <= {r.sop_instance_uid for r in daemon.journal.find_history(HistoryQuery())})
        found = {r.sop_instance_uid: r for r in daemon.journal.find_history(HistoryQuery())}
    finally:
        daemon.shutdown(timeout=5)
    assert (found[mg].outcome, found[mg].destination, found[mg].route, found[mg].modality) == (
        "delivered", "breast", "mammo", "MG")
    assert (found[ct].outcome, found[ct].destination, found[ct].modality, found[ct].file) == (
        "refused", "", "CT", "ct.dcm")
    assert found[ct].reason.startswith("routing: no route matches this file")


def test_routed_files_waiting_in_the_backlog_keep_their_route_and_reach_only_its_pacs(tmp_path):
    """A window of 2 and 8 routed files, both PACS away: the 6 in the journal's backlog are taken in with their
    route and their destinations (#14 item 7), each file once to its route's PACS only."""
    daemon, main, breast = make(tmp_path, [MAMMO, DEFAULT], active_window=2)
    for pacs in (main, breast):
        pacs.probe_error = PacsUnreachable(f"PACS {pacs.name!r} unreachable: connection refused")
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    daemon.start()
    try:
        sops = {name: drop(daemon, name, "MG" if i % 2 else "CT") for i, name in enumerate(f"f{i}.dcm" for i in range(8))}
        assert wait_until(lambda: len(daemon.journal.paths_under(str(daemon.spools[0].sending))) == 8)
        assert daemon.engine.window.held() == 2 and (main.calls, breast.calls) == ([], [])
        for pacs in (main, breast):
            pacs.probe_error = None
            daemon.engine.destinations[pacs.name].set_health(True)  # as the next probe finds
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 8)
    finally:
        daemon.shutdown(timeout=5)
        logger.remove(sink)
    for i, name in enumerate(sorted(sops, key=lambda n: int(n[1:-4]))):
        to, other = (breast, main) if i % 2 else (main, breast)
        assert (to.received(sops[name]), other.received(sops[name])) == (1, 0), name
    assert sum("routes=mammo" in line and "PACS forward breast delivered" in line for line in lines) >= 1
