"""The daemon's audit trail: the engine reports each batch's settled instances once, the Auditor turns them
into one message per study and destination, a reload into a Security Alert; off by default."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from relaypacsd import auditing
from relaypacsd.audit_syslog import BOM
from relaypacsd.config import build_config
from relaypacsd.delivery import Engine
from relaypacsd.dicomfile import inspect
from relaypacsd.journal import Update, open_journal
from relaypacsd.outcomes import Outcome
from relaypacsd.spool import Spool
from tests.audit_schema import check, coded
from tests.dicomfactory import write_study
from tests.helpers import ScriptedPacs, count, wait_until

WATCH = [{"path": "/srv/relaypacs/ct"}]


@pytest.fixture
def repository():
    """A UDP socket on loopback standing in for the network side of an audit repository (datagrams in)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def _received(sock, n):
    roots = []
    for _ in range(n):
        data = sock.recv(65535)
        roots.append(check(data.split(BOM, 1)[1]))
    return roots


def _engine(tmp_path, pacs, n):
    config = build_config({"watch": [{"path": str(tmp_path / "root")}],
                           "delivery": {"retry_delay": 0.01, "retry_attempts": 1, "workers_per_pacs": 1},
                           "pacs": {pacs.name: {"url": pacs.target}}}, {})
    spool = Spool(tmp_path / "root")
    spool.prepare()
    study, sops = write_study(spool.inbox, n)
    return Engine(config, open_journal(tmp_path / "state"), {pacs.name: pacs}), spool, study, sops


def _submit_all(engine, spool):
    for f in list(spool.files("inbox")):
        claimed = spool.claim(f)
        engine.submit(claimed, spool, inspect(claimed))


def test_the_engine_reports_each_settled_instance_once_and_no_wait(tmp_path):
    """Delivered and failed instances are reported with their batch; one that waits for a retry is not, until
    it settles."""
    tries: dict[str, int] = {}

    def rule(uid, n, call):
        tries[uid] = tries.get(uid, 0) + 1
        if uid == sops[0]:
            return Outcome.PERMANENT
        if uid == sops[1] and tries[uid] == 1:
            return Outcome.TRANSIENT  # waits for the sweep
        return Outcome.DELIVERED

    pacs = ScriptedPacs("pacs1", rule)
    engine, spool, study, sops = _engine(tmp_path, pacs, 4)
    reports: list[list[tuple[str, str]]] = []
    lock = threading.Lock()

    def observe(dest, settled):
        with lock:
            reports.append([(item.info.sop_instance_uid, update.state) for item, update in settled])

    engine.on_settled = observe
    engine.start()
    try:
        _submit_all(engine, spool)
        assert wait_until(lambda: count(spool, "sent") + count(spool, "failed") == 3)
        assert sops[1] not in [uid for r in reports for uid, _ in r]
        assert wait_until(lambda: (engine.sweep(), count(spool, "sent") == 3)[1], 10)
    finally:
        engine.stop()
    flat = sorted(uid for r in reports for uid, _ in r)
    assert flat == sorted(sops)  # each instance once
    assert dict(pair for r in reports for pair in r)[sops[0]] == "failed"


def test_an_observer_that_fails_never_stops_delivery(tmp_path):
    pacs = ScriptedPacs("pacs1")
    engine, spool, _, _ = _engine(tmp_path, pacs, 3)
    engine.on_settled = lambda dest, settled: 1 / 0
    engine.start()
    try:
        _submit_all(engine, spool)
        assert wait_until(lambda: count(spool, "sent") == 3)
    finally:
        engine.stop()


def test_audit_is_off_by_default_and_then_does_nothing():
    auditor = auditing.Auditor(build_config({"watch": WATCH}, {}))
    assert not auditor.enabled
    auditor.start()
    auditor.settled(SimpleNamespace(config=None), [(object(), object())])  # not even looked at
    auditor.config_reloaded(build_config({"watch": WATCH}, {}), build_config({"watch": WATCH}, {}))
    auditor.stop()
    assert auditor.pending() == 0 and auditor.counters.sent == 0


def test_the_auditor_sends_one_transfer_per_study_with_the_destination_and_its_ae_titles(repository):
    port = repository.getsockname()[1]
    config = build_config({"watch": WATCH, "audit": {"syslog": f"udp://127.0.0.1:{port}", "source_id": "GW_7"},
                           "pacs": {"pacs1": {"url": "http://pacs1.example.org:8042", "ae_title": "PACS1",
                                              "fallback": "cstore", "dicom_port": 4242, "calling_ae_title": "GW_AE"}}},
                          {})
    auditor = auditing.Auditor(config)
    auditor.start()
    try:
        dest = SimpleNamespace(name="pacs1", config=config.pacs["pacs1"])
        info = SimpleNamespace(study_instance_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
        item = SimpleNamespace(info=info)
        auditor.settled(dest, [(item, Update("x", "pacs1", "delivered", "delivered"))] * 2)
        start, transfer = _received(repository, 2)
    finally:
        auditor.stop()
    assert coded(start.find("EventIdentification/EventID"))[0] == "110100"
    app = start.find("ActiveParticipant")
    assert app.get("UserID") == "GW_7" and app.get("AlternativeUserID") == "AETITLES=GW_AE"
    participants = {coded(p.find("RoleIDCode"))[0]: p for p in transfer.findall("ActiveParticipant")}
    assert participants["110153"].get("AlternativeUserID") == "AETITLES=GW_AE"
    assert participants["110152"].get("UserID") == "http://pacs1.example.org:8042"
    assert participants["110152"].get("AlternativeUserID") == "AETITLES=PACS1"
    assert [s.get("NumberOfInstances") for s in transfer.iter("SOPClass")] == ["2"]
    [stop] = _received(repository, 1)
    assert [coded(t)[0] for t in stop.findall("EventIdentification/EventTypeCode")] == ["110121"]


def test_a_reload_keeps_the_auditor_unless_its_section_changed(repository):
    port = repository.getsockname()[1]
    old = build_config({"watch": WATCH, "audit": {"syslog": f"udp://127.0.0.1:{port}"}}, {})
    same = build_config({"watch": WATCH, "audit": {"syslog": f"udp://127.0.0.1:{port}"},
                         "delivery": {"retry_attempts": 5}}, {})
    moved = build_config({"watch": WATCH, "audit": {"syslog": f"udp://127.0.0.1:{port}", "source_id": "GW_NEW"}}, {})
    auditor = auditing.Auditor(old)
    auditor.start(announce=False)
    try:
        assert auditing.follow(auditor, old, same) is auditor
        fresh = auditing.follow(auditor, same, moved)
        try:
            assert fresh is not auditor and fresh.started and not auditor.started
            assert fresh.counters is auditor.counters  # the metrics' counters go on
            [told] = _received(repository, 1)  # the old one told its repository before it stopped
        finally:
            fresh.stop(announce=False)
    finally:
        auditor.stop(announce=False)
    assert coded(told.find("EventIdentification/EventID"))[0] == "110113"
    assert told.find("AuditSourceIdentification").get("AuditSourceID") == "RELAYPACS_GW"
