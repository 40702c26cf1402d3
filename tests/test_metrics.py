"""relaypacsd.metrics: a private registry, spool gauges read at scrape time, batch observer counters."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from relaypacsd.metrics import Metrics
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.snapshot import take
from relaypacsd.spool import Spool


def _samples(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(metrics.render().decode()) for s in fam.samples}


def _fake_snapshot(tmp_path):
    """A daemon's pieces, and the snapshot callable the daemon gives Metrics (taken at each scrape)."""
    spool = Spool(tmp_path / "root")
    spool.prepare()
    dest = SimpleNamespace(name="pacs1", healthy=False, down_reason="refused", queued=lambda: 3,
                           sender=SimpleNamespace(target="http://127.0.0.1:1/dicom-web"))
    engine = SimpleNamespace(destinations={"pacs1": dest}, in_flight=lambda: 2, backlog=lambda: 1)
    ready = threading.Event()
    ready.set()
    return (lambda: take([spool], engine, {"sent": 4, "failed": 1}, ready.is_set(), lambda: True, time.monotonic(),
                         folders=True)), spool, dest


def test_spool_gauges_and_health(tmp_path, monkeypatch):
    snapshot, spool, dest = _fake_snapshot(tmp_path)
    old = spool.sending / "a" / "old.dcm"
    old.parent.mkdir()
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 100, time.time() - 100))
    # Ages count from the arrival in the folder (ctime), not the mtime: the scrape comes 100 s later.
    later = time.time() + 100
    monkeypatch.setattr("relaypacsd.spool.time", SimpleNamespace(time=lambda: later))
    (spool.inbox / "new.dcm").write_bytes(b"x")
    (spool.failed / "bad.dcm").write_bytes(b"x")
    (spool.failed / "bad.dcm.error.json").write_text("{}")
    m = Metrics(snapshot)
    s = _samples(m)
    root = str(spool.root)
    assert s[("relaypacsd_files", (("folder", "sending"), ("root", root)))] == 1
    assert s[("relaypacsd_files", (("folder", "inbox"), ("root", root)))] == 1
    assert s[("relaypacsd_files", (("folder", "failed"), ("root", root)))] == 1  # sidecar not counted
    assert 99 < s[("relaypacsd_oldest_waiting_seconds", (("root", root),))] < 110
    assert s[("relaypacsd_destination_up", (("pacs", "pacs1"),))] == 0
    assert s[("relaypacsd_destination_queued", (("pacs", "pacs1"),))] == 3
    assert s[("relaypacsd_files_settled_total", (("folder", "sent"),))] == 4
    assert s[("relaypacsd_in_flight", ())] == 2 and s[("relaypacsd_backlog", ())] == 1
    dest.healthy = True  # read at scrape time
    assert _samples(m)[("relaypacsd_destination_up", (("pacs", "pacs1"),))] == 1


def test_batch_observer_counts_outcomes_retries_and_latency(tmp_path):
    snapshot, _, dest = _fake_snapshot(tmp_path)
    m = Metrics(snapshot)
    ok = InstanceResult(sop_uid="1.2", outcome=Outcome.DELIVERED, reason="", http_status=200, reason_code=None)
    dup = InstanceResult(sop_uid="1.3", outcome=Outcome.DUPLICATE, reason="", http_status=200, reason_code=None)
    bad = InstanceResult(sop_uid="1.4", outcome=Outcome.TRANSIENT, reason="503", http_status=503, reason_code=None)
    m.observe_batch(dest, [None] * 3, [ok, dup, bad], 202, 120.0, 1)
    m.observe_batch(dest, [None], [ok], 200, 30.0, 2)
    s = _samples(m)
    assert s[("relaypacsd_delivered_total", (("pacs", "pacs1"),))] == 3
    assert s[("relaypacsd_delivery_failures_total", (("pacs", "pacs1"),))] == 1
    assert s[("relaypacsd_retries_total", (("pacs", "pacs1"),))] == 1
    assert s[("relaypacsd_instances_total", (("outcome", "transient"), ("pacs", "pacs1")))] == 1
    assert s[("relaypacsd_delivery_seconds_count", (("pacs", "pacs1"),))] == 2
    assert s[("relaypacsd_delivery_seconds_bucket", (("le", "0.05"), ("pacs", "pacs1")))] == 1


def test_private_registry_two_daemons_do_not_clash(tmp_path):
    a, _, _ = _fake_snapshot(tmp_path / "a")
    b, _, _ = _fake_snapshot(tmp_path / "b")
    Metrics(a), Metrics(b)  # the same metric names twice: fine in private registries
    assert REGISTRY.get_sample_value("relaypacsd_delivered_total", {"pacs": "pacs1"}) is None


def test_audit_messages_sent_dropped_and_queued_are_read_at_each_scrape(tmp_path):
    from relaypacsd.audit_syslog import AuditCounters

    snapshot, _, _ = _fake_snapshot(tmp_path)
    metrics = Metrics(snapshot)
    counters, queued = AuditCounters(sent=5, dropped=2), [7]
    metrics.watch_audit(lambda: (counters, queued[0]))
    samples = _samples(metrics)
    assert samples[("relaypacsd_audit_messages_total", (("outcome", "sent"),))] == 5
    assert samples[("relaypacsd_audit_messages_total", (("outcome", "dropped"),))] == 2
    assert samples[("relaypacsd_audit_queued", ())] == 7
    counters.sent, queued[0] = 9, 0
    samples = _samples(metrics)
    assert samples[("relaypacsd_audit_messages_total", (("outcome", "sent"),))] == 9
    assert samples[("relaypacsd_audit_queued", ())] == 0
