"""Prometheus metrics of one daemon, in a private registry (no global state), served over HTTP when asked.

Gauges that describe the spool (files per folder, oldest waiting file, PACS health) come from a snapshot
taken at scrape time (`relaypacsd.snapshot`), so they stay right across a SIGHUP reload. Counters of
deliveries come from the engine's batch observer (`Engine.on_batch`) and the snapshot's per-run counters.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from relaypacsd.errors import ConfigError
from relaypacsd.outcomes import Outcome
from relaypacsd.snapshot import Snapshot

PREFIX = "relaypacsd"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _SpoolCollector(Collector):
    """Turns one snapshot, with its folder walk, into gauges at each scrape."""

    def __init__(self, take: Callable[[], Snapshot]):
        self.take = take

    def collect(self) -> Iterator[Any]:
        snap = self.take()
        files = GaugeMetricFamily(f"{PREFIX}_files", "Files per folder of each watch root", labels=["root", "folder"])
        oldest = GaugeMetricFamily(f"{PREFIX}_oldest_waiting_seconds",
                                   "Age of the oldest file in inbox/ or sending/ of each watch root (0 if none)",
                                   labels=["root"])
        for root in snap.folders:
            for folder, count in root.counts().items():
                files.add_metric([root.root, folder], count)
            oldest.add_metric([root.root], root.oldest_waiting_seconds or 0.0)
        yield files
        yield oldest

        up = GaugeMetricFamily(f"{PREFIX}_destination_up", "1 while the PACS answers and accepts our credentials",
                               labels=["pacs"])
        queued = GaugeMetricFamily(f"{PREFIX}_destination_queued", "Files queued, waiting or in flight per PACS",
                                   labels=["pacs"])
        for dest in snap.destinations:
            up.add_metric([dest.name], 1.0 if dest.healthy else 0.0)
            queued.add_metric([dest.name], dest.queued)
        yield up
        yield queued

        yield from _node_metrics(snap)

        in_flight = GaugeMetricFamily(f"{PREFIX}_in_flight", "Files known to the delivery engine, not yet settled")
        in_flight.add_metric([], snap.in_flight)
        yield in_flight
        backlog = GaugeMetricFamily(f"{PREFIX}_backlog", "Of those, files waiting in the journal's backlog, outside "
                                    "the engine's active window (delivery.active_window)")
        backlog.add_metric([], snap.backlog)
        yield backlog
        alive = GaugeMetricFamily(f"{PREFIX}_alive", "1 while every watcher, worker and job thread runs")
        alive.add_metric([], 1.0 if snap.alive else 0.0)
        yield alive
        settled = CounterMetricFamily(f"{PREFIX}_files_settled", "Files moved to sent/ or failed/ since start",
                                      labels=["folder"])
        settled.add_metric(["sent"], snap.sent)
        settled.add_metric(["failed"], snap.failed)
        yield settled


def _node_metrics(snap: Snapshot) -> Iterator[Any]:
    """Every gateway of the spool as the journal knows it: up, heartbeat age, files held, PACS as it sees them."""
    up = GaugeMetricFamily(f"{PREFIX}_node_up", "1 while a gateway of this spool holds its lease", labels=["node", "host"])
    age = GaugeMetricFamily(f"{PREFIX}_node_heartbeat_age_seconds", "Seconds since each gateway's last heartbeat",
                            labels=["node"])
    files = GaugeMetricFamily(f"{PREFIX}_node_files", "Files in sending/ each gateway holds", labels=["node"])
    pacs = GaugeMetricFamily(f"{PREFIX}_node_destination_up", "Each PACS's health as each gateway sees it",
                             labels=["node", "pacs"])
    for node in snap.nodes:
        up.add_metric([node["name"], node["host"]], 1.0 if node["state"] == "alive" else 0.0)
        age.add_metric([node["name"]], node["heartbeat_age_seconds"])
        files.add_metric([node["name"]], node["files"])
        for name, health in node["pacs"].items():
            pacs.add_metric([node["name"], name], 1.0 if health["healthy"] else 0.0)
    yield from (up, age, files, pacs)


class _AuditCollector(Collector):
    """Audit messages sent, dropped and queued (audit_syslog), read at each scrape."""

    def __init__(self, read: Callable[[], tuple[Any, int]]):
        self.read = read

    def collect(self) -> Iterator[Any]:
        counters, queued = self.read()
        messages = CounterMetricFamily(f"{PREFIX}_audit_messages", "DICOM audit messages sent to the audit "
                                       "repository, or dropped (queue full, or left at stop)", labels=["outcome"])
        messages.add_metric(["sent"], counters.sent)
        messages.add_metric(["dropped"], counters.dropped)
        yield messages
        waiting = GaugeMetricFamily(f"{PREFIX}_audit_queued", "DICOM audit messages waiting for the repository")
        waiting.add_metric([], queued)
        yield waiting


class Metrics:
    """The metrics of one daemon: a private registry, the engine observer, and an optional HTTP server."""

    def __init__(self, take: Callable[[], Snapshot]):
        """`take` returns the daemon's snapshot with its folders walked: called once per scrape."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_SpoolCollector(take))
        self.instances = Counter(f"{PREFIX}_instances", "Instance outcomes per PACS and send attempt",
                                 ["pacs", "outcome"], registry=self.registry)
        self.delivered = Counter(f"{PREFIX}_delivered", "Instances the PACS confirmed (stored or already there)",
                                 ["pacs"], registry=self.registry)
        self.failed = Counter(f"{PREFIX}_delivery_failures", "Instances a send attempt did not deliver",
                              ["pacs"], registry=self.registry)
        self.retries = Counter(f"{PREFIX}_retries", "Send attempts that were retries (attempt 2 and later)",
                               ["pacs"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_delivery_seconds", "Duration of one STOW-RS request (one batch)",
                                 ["pacs"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def observe_batch(self, dest: Any, items: list[Any], results: list[Any], status: int | None, ms: float,
                      attempt: int) -> None:
        """Engine.on_batch: count outcomes, retries and the request's duration."""
        name = dest.name
        self.latency.labels(name).observe(ms / 1000.0)
        if attempt > 1:
            self.retries.labels(name).inc()
        for result in results:
            self.instances.labels(name, result.outcome.value).inc()
            if result.outcome.delivered:
                self.delivered.labels(name).inc()
            elif result.outcome is not Outcome.SPLIT:
                self.failed.labels(name).inc()

    def watch_audit(self, read: Callable[[], tuple[Any, int]]) -> None:
        """Serve the audit counters: `read()` gives (AuditCounters, messages queued) at each scrape."""
        self.registry.register(_AuditCollector(read))

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    def start_server(self, address: str, port: int) -> None:
        """Serve /metrics on address:port (a thread of its own)."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve(address: str, port: int, take: Callable[[], Snapshot]) -> Metrics:
    """Metrics served on address:port; a ConfigError naming the key when the port cannot be had."""
    metrics = Metrics(take)
    try:
        metrics.start_server(address, port)
    except OSError as exc:
        raise ConfigError(f"daemon.metrics_port = {port} on {address}: cannot listen there ({exc.strerror}): "
                          "another process uses it? pick another port, or 0 to turn metrics off") from None
    return metrics
