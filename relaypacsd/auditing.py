"""The daemon's audit trail: which of its events become which DICOM audit message (`audit.py`), handed to the
syslog sender (`audit_syslog.py`). With [audit] syslog empty every hook does nothing.

Events: the daemon's start and stop (Application Activity), each batch's settled instances per study and
destination (DICOM Instances Transferred), each reload, done or refused (Security Alert).
"""

from __future__ import annotations

import functools
import os
import pwd
import socket
import time
from pathlib import Path
from typing import Any

from relaypacsd import audit
from relaypacsd.audit_syslog import AuditCounters, SyslogSender
from relaypacsd.config import Config


class Auditor:
    """The audit messages of one daemon, to the repository its [audit] section names (or nowhere)."""

    def __init__(self, config: Config, counters: AuditCounters | None = None):
        self.settings = config.audit
        self.counters = counters if counters is not None else AuditCounters()
        self.enabled = bool(self.settings.syslog)
        self.started = False
        self.follow(config)
        self._sender: SyslogSender | None = None
        if self.enabled:
            s = self.settings
            self._sender = SyslogSender(s.syslog, ca_bundle=s.ca_bundle, client_cert=s.client_cert,
                                        client_key=s.client_key, queue_size=s.queue_size, counters=self.counters)

    def follow(self, config: Config) -> None:
        """Take the identity (AE titles) and config source of `config`, keeping the repository and queue."""
        titles = sorted({p.calling_ae_title for p in config.active() if p.fallback == "cstore" and p.calling_ae_title})
        self.identity = audit.Identity(self.settings.source_id, socket.gethostname(), tuple(titles))
        self._source = config.source

    def start(self, announce: bool = True) -> None:
        """Start the sender thread and, with `announce`, send Application Start."""
        self.started = True
        if self._sender is None:
            return
        self._sender.start()
        if announce:
            self._sender.submit(audit.application_activity(self.identity, True, _os_user(), time.time()))

    def stop(self, timeout: float = 5.0, announce: bool = True) -> None:
        """With `announce`, send Application Stop; send what waits for up to `timeout` s; stop the thread."""
        if self._sender is None or not self.started:
            return
        if announce:
            self._sender.submit(audit.application_activity(self.identity, False, _os_user(), time.time()))
        self._sender.stop(timeout)
        self.started = False

    def pending(self) -> int:
        """Messages queued for the repository."""
        return self._sender.pending() if self._sender is not None else 0

    def settled(self, dest: Any, settled: list[tuple[Any, Any]]) -> None:
        """Engine.on_settled: DICOM Instances Transferred for each study of one batch's settled instances at
        `dest`. Only grouping here; the XML is made in the sender thread."""
        if self._sender is None:
            return
        pacs = dest.config
        calling = pacs.calling_ae_title if pacs.fallback == "cstore" else ""
        when = time.time()
        for transfer in audit.transfers(audit.peer_of(pacs), calling, settled):
            self._sender.submit(functools.partial(audit.instances_transferred, self.identity, transfer, when))

    def config_reloaded(self, old: Config, new: Config) -> None:
        """Security Alert (Software Configuration): the daemon runs with a reloaded configuration."""
        changed = ", ".join(audit.changed_sections(old, new)) or "nothing"
        self._alert(f"configuration reloaded from {new.source or '(no file)'}; changed: {changed}", audit.SUCCESS)

    def reload_refused(self) -> None:
        """Security Alert (minor failure): a reload was refused; the previous configuration stays."""
        self._alert(f"configuration reload from {self._source or '(no file)'} refused; the previous configuration "
                    "stays in force (the daemon's log says why)", audit.MINOR_FAILURE)

    def _alert(self, description: str, outcome: str) -> None:
        if self._sender is not None:
            self._sender.submit(audit.security_alert(self.identity, _uri(self._source), description, outcome,
                                                     time.time()))


def follow(auditor: Auditor, old: Config, new: Config) -> Auditor:
    """The auditor for a reloaded config: the same one if [audit] did not change; else a new one (started),
    after the old one told its repository and sent what it held."""
    if new.audit == old.audit:
        auditor.follow(new)
        return auditor
    fresh = Auditor(new, auditor.counters)
    fresh.start(announce=False)
    if auditor.started:
        auditor.config_reloaded(old, new)  # the old repository hears that it stops hearing from us, and why
        auditor.stop(announce=False)
    return fresh


def _os_user() -> str:
    """The user the daemon runs as: the Application Launcher of Application Activity."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _uri(source: str) -> str:
    """The configuration file as a file:// URI (the Security Alert's subject)."""
    if not source or source == "(no file)":
        return "relaypacsd:environment"  # no file: the configuration came from the environment alone
    return Path(source).absolute().as_uri()
