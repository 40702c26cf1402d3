"""Audit messages against a real rsyslog (the audit repository): over TCP, UDP and TLS; a repository that goes
away and comes back; a full queue; and the real daemon's messages while it forwards to a real Orthanc."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from relaypacsd import audit
from relaypacsd.audit_syslog import BOM, SyslogSender
from tests.audit_schema import check, coded
from tests.dicomfactory import write_study
from tests.integration.daemon_helpers import (count_in, daemon_log, start_daemon, stop_daemon, wait_for, wait_ready,
                                              write_config)
from tests.integration.pipeline_helpers import captured_log
from tests.integration.rsyslog_helpers import LocalRsyslog

GW = audit.Identity("RELAYPACS_GW", "gw1.example.org", ("RELAYPACS_GW",))


def _xml(frame) -> bytes:
    msg = frame.group("msg")
    assert msg.startswith(BOM), msg[:20]
    return msg[len(BOM):]


def _events(server: LocalRsyslog) -> list[tuple[str, list[str]]]:
    """(EventID, EventTypeCodes) of every message the repository holds, each checked against the schema."""
    found = []
    for frame in server.frames():
        ev = check(_xml(frame)).find("EventIdentification")
        found.append((coded(ev.find("EventID"))[0], [coded(t)[0] for t in ev.findall("EventTypeCode")]))
    return found


def _marked(n: int) -> bytes:
    """A valid audit message told apart by its launcher's name."""
    return audit.application_activity(GW, True, f"user-{n}", time.time())


def _launchers(server: LocalRsyslog) -> list[str]:
    return [check(_xml(f)).findall("ActiveParticipant")[1].get("UserID") for f in server.frames()]


@pytest.mark.parametrize("scheme", ["tcp", "udp", "tls"])
def test_messages_reach_a_real_rsyslog(rsyslog: LocalRsyslog, scheme: str) -> None:
    """RFC 5424 frames (octet-counted over TCP and TLS, datagrams over UDP), each holding one schema-valid message."""
    sender = SyslogSender(rsyslog.url(scheme), ca_bundle=str(rsyslog.ca) if scheme == "tls" else "",
                          hostname="gw1.example.org")
    sender.start()
    try:
        peer = audit.Peer("https://pacs.example.org/dicom-web", "PACS", "pacs")
        transfer = audit.Transfer("1.2.3", "PAT-1", peer, sop_classes={"1.2.840.10008.5.1.4.1.1.2": 3}, delivered=3)
        sender.submit(audit.application_activity(GW, True, "relaypacs", time.time()))
        sender.submit(lambda: audit.instances_transferred(GW, transfer, time.time()))  # rendered in the thread
        sender.submit(audit.security_alert(GW, "file:///etc/relaypacs/relaypacs.toml", "reloaded", audit.SUCCESS,
                                           time.time()))
        wait_for(lambda: len(rsyslog.lines()) >= 3, 10, message=rsyslog.log_tail)
    finally:
        sender.stop()
    frames = rsyslog.frames()
    assert len(frames) == 3 and sender.counters.sent == 3 and sender.counters.dropped == 0
    for f in frames:
        assert (f.group("pri"), f.group("msgid"), f.group("host"), f.group("app")) == (
            b"85", b"DICOM+RFC3881", b"gw1.example.org", b"relaypacsd")
    assert _events(rsyslog) == [("110100", ["110120"]), ("110104", []), ("110113", ["110131"])]


def test_tls_is_refused_by_a_repository_whose_certificate_cannot_be_verified(rsyslog: LocalRsyslog) -> None:
    """Without our CA the test repository's certificate is not trusted: nothing is sent, one warning says why."""
    sender = SyslogSender(rsyslog.tls_url)
    with captured_log() as lines:
        sender.start()
        sender.submit(_marked(1))
        wait_for(lambda: any("unreachable" in line for line in lines), 10)
        sender.stop(timeout=0.5)
    assert rsyslog.lines() == [] and sender.counters.sent == 0 and sender.counters.dropped == 1
    assert any("certificate verify failed" in line.lower() or "certificate" in line.lower() for line in lines), lines


def test_a_repository_that_goes_away_gets_every_message_once_it_is_back(rsyslog: LocalRsyslog) -> None:
    """Messages queue while rsyslog is stopped, and arrive in order, each once, after it restarts; the queued
    connection to the old process is noticed as closed, not written into."""
    sender = SyslogSender(rsyslog.tcp_url, backoff_max=0.5)
    with captured_log() as lines:
        sender.start()
        try:
            for n in range(2):
                sender.submit(_marked(n))
            wait_for(lambda: len(rsyslog.lines()) == 2, 10, message=rsyslog.log_tail)
            rsyslog.stop()
            started = time.monotonic()
            for n in range(2, 6):
                assert sender.submit(_marked(n))
            assert time.monotonic() - started < 0.1  # the caller never waits for the repository
            wait_for(lambda: any("unreachable" in line for line in lines), 10)
            time.sleep(1.0)
            assert sender.pending() == 4
            rsyslog.start()
            wait_for(lambda: len(rsyslog.lines()) >= 6, 15, message=rsyslog.log_tail)
            time.sleep(0.3)
        finally:
            sender.stop()
    assert _launchers(rsyslog) == [f"user-{n}" for n in range(6)]
    assert sender.counters.sent == 6 and sender.counters.dropped == 0
    assert len([line for line in lines if "unreachable" in line]) == 1, lines  # one warning per outage
    assert len([line for line in lines if "reachable again" in line]) == 1, lines


def test_a_full_queue_drops_with_a_counter_and_one_warning(rsyslog: LocalRsyslog) -> None:
    """Repository away, queue of 3: 7 of 10 messages are dropped and counted; the 3 kept arrive once it is back."""
    rsyslog.stop()
    sender = SyslogSender(rsyslog.tcp_url, queue_size=3, backoff_max=0.5)
    with captured_log() as lines:
        sender.start()
        try:
            accepted = [sender.submit(_marked(n)) for n in range(10)]
            assert accepted == [True] * 3 + [False] * 7
            assert sender.counters.dropped == 7
            rsyslog.start()
            wait_for(lambda: len(rsyslog.lines()) >= 3, 15, message=rsyslog.log_tail)
            time.sleep(0.3)
        finally:
            sender.stop()
    assert _launchers(rsyslog) == ["user-0", "user-1", "user-2"]
    assert sender.counters.sent == 3 and sender.counters.dropped == 7
    assert len([line for line in lines if "is full" in line]) == 1, lines


# -- the real daemon ----------------------------------------------------------------------------------------

def _drop_study(tmp_path: Path, n: int) -> tuple[str, list[str]]:
    study, sops = write_study(tmp_path / "staging", n)
    for f in sorted((tmp_path / "staging").iterdir()):
        f.rename(tmp_path / "spool" / "inbox" / f.name)
    return study, sops


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_the_daemon_audits_its_start_transfers_reload_and_stop(tmp_path: Path, clean_orthanc, rsyslog: LocalRsyslog,
                                                               scheme: str) -> None:
    """`relaypacsd run` with [audit]: Application Start, one Instances Transferred per study and destination
    (the Orthanc's URL, the study, its SOP class counts), a Security Alert at SIGHUP, Application Stop."""
    audit_table = {"syslog": rsyslog.url(scheme), "source_id": "GW_TEST"}
    cfg = write_config(tmp_path, clean_orthanc, audit=audit_table)
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        study, sops = _drop_study(tmp_path, 3)
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == 3, 30, message=lambda: daemon_log(proc)[-3000:])
        wait_for(lambda: any(e == "110104" for e, _ in _events(rsyslog)), 10, message=rsyslog.log_tail)
        write_config(tmp_path, clean_orthanc, audit=audit_table, delivery={"retry_attempts": 4})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e == "110113" for e, _ in _events(rsyslog)), 20, message=lambda: daemon_log(proc)[-3000:])
    finally:
        assert stop_daemon(proc) == 0
    events = _events(rsyslog)
    assert events[0] == ("110100", ["110120"]) and events[-1] == ("110100", ["110121"]), events
    assert ("110113", ["110131"]) in events
    roots = [check(_xml(f)) for f in rsyslog.frames()]
    assert all(r.find("AuditSourceIdentification").get("AuditSourceID") == "GW_TEST" for r in roots)
    transfers = [r for r in roots if coded(r.find("EventIdentification/EventID"))[0] == "110104"]
    studies = [o for r in transfers for o in r.findall("ParticipantObjectIdentification")
               if coded(o.find("ParticipantObjectIDTypeCode"))[0] == "110180"]
    assert {o.get("ParticipantObjectID") for o in studies} == {study}
    assert sum(int(s.get("NumberOfInstances")) for o in studies for s in o.iter("SOPClass")) == 3  # every instance once
    for r in transfers:
        assert r.find("EventIdentification").get("EventOutcomeIndicator") == "0"
        dest = [p for p in r.findall("ActiveParticipant") if coded(p.find("RoleIDCode"))[0] == "110152"]
        assert [p.get("UserID") for p in dest] == [f"{clean_orthanc.url}/dicom-web"]
        assert len(r.findall("ParticipantObjectIdentification")) == 2  # the study and the patient
    alert = next(r for r in roots if coded(r.find("EventIdentification/EventID"))[0] == "110113")
    import base64
    description = base64.b64decode(alert.find(".//ParticipantObjectDetail").get("value")).decode()
    assert "changed: delivery" in description and alert.find(".//ParticipantObjectIdentification").get(
        "ParticipantObjectID") == cfg.absolute().as_uri()


def test_delivery_goes_on_while_the_repository_is_away_and_it_gets_the_messages_after(
        tmp_path: Path, clean_orthanc, rsyslog: LocalRsyslog) -> None:
    """The audit repository is down from the start: files are delivered as fast as without audit; once it is
    back, Application Start and the transfer arrive."""
    rsyslog.stop()
    cfg = write_config(tmp_path, clean_orthanc, audit={"syslog": rsyslog.tcp_url})
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        started = time.monotonic()
        study, _ = _drop_study(tmp_path, 4)
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == 4, 30, message=lambda: daemon_log(proc)[-3000:])
        took = time.monotonic() - started
        assert rsyslog.lines() == []
        rsyslog.start()
        wait_for(lambda: any(e == "110104" for e, _ in _events(rsyslog)), 30,
                 message=lambda: daemon_log(proc)[-3000:] + rsyslog.log_tail())
    finally:
        assert stop_daemon(proc) == 0
    assert took < 15, f"delivery took {took:.1f} s with the audit repository away"
    log = daemon_log(proc)
    assert log.count("audit: repository") >= 1 and "unreachable" in log and "reachable again" in log
    events = _events(rsyslog)
    assert events[0] == ("110100", ["110120"]) and ("110104", []) in events and events[-1] == ("110100", ["110121"])


def test_a_reload_that_moves_the_audit_trail_tells_both_repositories(tmp_path: Path, clean_orthanc,
                                                                     rsyslog: LocalRsyslog) -> None:
    """SIGHUP with a new [audit] syslog: the old repository hears the reload (its last message), the new one
    hears it too and gets the rest; a refused reload is a Security Alert with a minor failure."""
    second = LocalRsyslog(tmp_path / "second", rsyslog.certs).start()
    try:
        cfg = write_config(tmp_path, clean_orthanc, audit={"syslog": rsyslog.tcp_url})
        proc = start_daemon(cfg)
        try:
            wait_ready(proc)
            write_config(tmp_path, clean_orthanc, audit={"syslog": second.tcp_url})
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: any(e == "110113" for e, _ in _events(second)), 20,
                     message=lambda: daemon_log(proc)[-3000:])
            cfg.write_text(cfg.read_text().replace("[audit]", "[audit]\nsislog = 1"))  # a typo: refused
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(_events(second)) >= 2, 20, message=lambda: daemon_log(proc)[-3000:])
            _drop_study(tmp_path, 2)
            wait_for(lambda: count_in(tmp_path / "spool", "sent") == 2, 30, message=lambda: daemon_log(proc)[-3000:])
            wait_for(lambda: any(e == "110104" for e, _ in _events(second)), 10)
        finally:
            assert stop_daemon(proc) == 0
        assert [e for e, _ in _events(rsyslog)] == ["110100", "110113"]  # started, then told of the move
        first_roots = [check(_xml(f)) for f in rsyslog.frames()]
        assert first_roots[1].find("EventIdentification").get("EventOutcomeIndicator") == "0"
        roots = [check(_xml(f)) for f in second.frames()]
        ids = [coded(r.find("EventIdentification/EventID"))[0] for r in roots]
        assert ids[:2] == ["110113", "110113"] and ids[-1] == "110100" and "110104" in ids, ids
        outcomes = [r.find("EventIdentification").get("EventOutcomeIndicator") for r in roots[:2]]
        assert outcomes == ["0", "4"]  # the reload, then the refused one
    finally:
        second.stop()


@pytest.mark.parametrize("scheme", ["tls", "tcp"])
def test_check_connects_to_the_audit_repository_and_says_what_to_fix(tmp_path: Path, rsyslog: LocalRsyslog,
                                                                     scheme: str) -> None:
    import subprocess
    import sys

    from tests.integration.daemon_helpers import daemon_env

    def check_line(audit_table: dict) -> tuple[int, str]:
        cfg = write_config(tmp_path, None, audit=audit_table, pacs_tables={})
        res = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "check"], capture_output=True,
                             text=True, env=daemon_env(), timeout=60)
        return res.returncode, next(line for line in res.stdout.splitlines() if "audit repository" in line)

    ca = {"ca_bundle": str(rsyslog.ca)} if scheme == "tls" else {}
    code, line = check_line({"syslog": rsyslog.url(scheme), **ca})
    assert code == 0 and line.startswith("ok   audit repository"), line
    if scheme == "tls":
        code, line = check_line({"syslog": rsyslog.tls_url})  # the system's CAs do not know the test CA
        assert code == 1 and line.startswith("FAIL") and "ca_bundle" in line, line
    rsyslog.stop()
    code, line = check_line({"syslog": rsyslog.url(scheme), **ca})
    assert code == 1 and "unreachable" in line and "[audit] syslog" in line, line


def test_mutual_tls_sends_with_our_certificate_and_not_without_it(rsyslog: LocalRsyslog) -> None:
    """An ATNA repository wants the gateway's certificate: with client_cert the message arrives, without it
    the repository refuses the connection and the message waits."""
    without = SyslogSender(rsyslog.mtls_url, ca_bundle=str(rsyslog.ca), backoff_max=0.5)
    with captured_log() as lines:
        without.start()
        without.submit(_marked(0))
        time.sleep(1.5)
        without.stop(timeout=0.5)
    # In TLS 1.3 the refusal comes after our handshake: counted as sent, the message would have been lost.
    assert rsyslog.lines() == [] and without.counters.sent == 0 and without.counters.dropped == 1
    assert any("unreachable" in line and "client_cert" in line for line in lines), lines
    with_cert = SyslogSender(rsyslog.mtls_url, ca_bundle=str(rsyslog.ca), client_cert=str(rsyslog.client_cert))
    with_cert.start()
    try:
        with_cert.submit(_marked(1))
        wait_for(lambda: len(rsyslog.lines()) == 1, 10, message=rsyslog.log_tail)
    finally:
        with_cert.stop()
    assert _launchers(rsyslog) == ["user-1"] and with_cert.counters.sent == 1
