"""`check`: validate the config and test every active PACS step by step, one line per check with its fix."""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from relaypacsd.commands.common import EXIT_FAIL, EXIT_OK, load
from relaypacsd.config import AuditConfig, PacsConfig
from relaypacsd.errors import DestinationProblem, PacsError, RelayPacsError
from relaypacsd.http import env_prefix


class Checker:
    def __init__(self) -> None:
        self.failures = 0

    def ok(self, what: str, detail: str = "") -> None:
        print(f"ok   {what}" + (f": {detail}" if detail else ""))

    def fail(self, what: str, problem: str, fix: str) -> None:
        self.failures += 1
        print(f"FAIL {what}: {problem}: {fix}")

    def skip(self, what: str, why: str) -> None:
        print(f"skip {what}: {why}")


def check_pacs(pacs: PacsConfig, c: Checker) -> None:
    """DNS, TCP, TLS, credentials, DICOMweb endpoint, C-ECHO: stop the HTTP chain at the first failure."""
    from relaypacsd.dicomweb import DicomWebClient

    env = env_prefix(pacs)
    name = f"PACS {pacs.name}"
    parts = urlsplit(pacs.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    http_ok = True
    try:
        addrs = sorted({a[4][0] for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        c.ok(f"{name} DNS {host}", ", ".join(addrs))
    except OSError:
        c.fail(f"{name} DNS {host}", "PACS unreachable (host name not found)",
               f"check the host name in {env}URL / [pacs.{pacs.name}] url and the machine's DNS")
        http_ok = False
    if http_ok:
        try:
            with socket.create_connection((host, port), timeout=pacs.connect_timeout) as sock:
                c.ok(f"{name} TCP {host}:{port}", "connected")
                if parts.scheme == "https":
                    _check_tls(pacs, sock, host, c)
        except OSError as exc:
            c.fail(f"{name} TCP {host}:{port}", f"PACS unreachable ({exc.strerror or exc})",
                   "is the PACS running? check the port in the URL and any firewall between here and there")
            http_ok = False
    if http_ok:
        client = DicomWebClient(pacs, pool_size=1)
        try:
            client.probe()
            c.ok(f"{name} credentials", "accepted" if (pacs.username or pacs.token or pacs.password_file
                                                        or pacs.token_file) else "none needed")
            c.ok(f"{name} DICOMweb endpoint {client.base}", "QIDO-RS answers")
        except DestinationProblem as exc:
            if exc.status in (401, 403):
                c.fail(f"{name} credentials", "Authentication failed", str(exc))
            else:
                c.ok(f"{name} credentials", "accepted")
                c.fail(f"{name} DICOMweb endpoint {client.base}", "DICOMweb endpoint not found", str(exc))
        except PacsError as exc:
            c.fail(f"{name} DICOMweb endpoint {client.base}", "PACS answered badly", str(exc))
    elif pacs.fallback == "cstore":
        print(f"warn {name}: DICOMweb unusable; deliveries would use the C-STORE fallback")
    if pacs.dicom_port:
        from relaypacsd.cstore import CStoreSender

        sender = CStoreSender(pacs)
        what = f"{name} C-ECHO {sender.called}@{sender.host}:{sender.port} from {sender.calling}"
        try:
            ms = sender.echo()
            c.ok(what, f"answered in {ms:.0f} ms")
        except DestinationProblem as exc:
            c.fail(what, "association rejected", str(exc))
        except PacsError as exc:
            c.fail(what, "PACS unreachable on its DICOM port", str(exc))


def _check_tls(pacs: PacsConfig, sock: socket.socket, host: str, c: Checker) -> None:
    # A CA bundle is a PEM file or a hashed certificate folder (c_rehash), as requests accepts both.
    folder = bool(pacs.ca_bundle) and os.path.isdir(pacs.ca_bundle)
    ctx = ssl.create_default_context(cafile=None if folder else pacs.ca_bundle or None,
                                     capath=pacs.ca_bundle if folder else None)
    if not pacs.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if pacs.client_cert:
        ctx.load_cert_chain(pacs.client_cert, pacs.client_key or None)
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            c.ok(f"PACS {pacs.name} TLS", f"{tls.version()}, certificate "
                 + ("trusted" if pacs.verify_tls else "NOT verified (verify_tls = false)"))
    except ssl.SSLCertVerificationError as exc:
        c.fail(f"PACS {pacs.name} TLS", f"certificate not trusted ({exc.verify_message})",
               f"set [pacs.{pacs.name}] ca_bundle to the CA that signed the PACS's certificate")
    except (ssl.SSLError, OSError) as exc:
        c.fail(f"PACS {pacs.name} TLS", f"TLS handshake failed ({exc})",
               "is this port really HTTPS? check the URL scheme, client_cert / client_key")


def check_audit(audit: AuditConfig, c: Checker) -> None:
    """The audit repository: a connection (and the TLS handshake) for tcp:// and tls://; nothing to test for udp://."""
    from relaypacsd.audit_syslog import SyslogSender

    what = f"audit repository {audit.syslog}"
    if audit.syslog.lower().startswith("udp://"):
        c.skip(what, "UDP has no connection to test (messages go out without an answer); tcp:// or tls:// can be checked")
        return
    try:
        sender = SyslogSender(audit.syslog, ca_bundle=audit.ca_bundle, client_cert=audit.client_cert,
                              client_key=audit.client_key, timeout=5.0)
        c.ok(what, sender.probe())
    except ssl.SSLCertVerificationError as exc:
        c.fail(what, f"certificate not trusted ({exc.verify_message})",
               "set [audit] ca_bundle to the CA that signed the repository's certificate")
    except (ssl.SSLError, OSError) as exc:
        c.fail(what, f"audit repository unreachable ({getattr(exc, 'strerror', None) or exc})",
               "is it running? check the host and port in [audit] syslog, the firewall, and for tls:// the certificates")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and test every active PACS, one line per check with the fix for each failure."""
    from relaypacsd.spool import Spool

    config = load(args)
    c = Checker()
    if config.source == "(no file)":
        print("warn no config file (looked at --config, $RELAYPACS_CONFIG, /etc/relaypacs/relaypacs.toml): "
              "checking the defaults and the environment")
    else:
        c.ok(f"config {config.source}")
    if not config.watch:
        c.fail("watch roots", "none: the daemon refuses to start", "add a [[watch]] table with path = \"/srv/relaypacs/...\"")
    for w in config.watch:
        if not os.path.isdir(w.path):
            # Not created here: a share that is not mounted would then pass as a fresh local folder.
            print(f"warn watch root {w.path} does not exist: the daemon creates it at start; if it is a share, "
                  "mount it first")
            continue
        try:
            Spool(Path(w.path)).prepare()
            c.ok(f"watch root {w.path}")
        except RelayPacsError as exc:
            c.fail(f"watch root {w.path}", "unusable", str(exc))
    for pacs in config.active():
        check_pacs(pacs, c)
    if config.audit.syslog:
        check_audit(config.audit, c)
    if not config.active():
        print("warn no active PACS: set ORTHANC_URL (or [pacs.NAME] url) and ACTIVE_PACS")
    print(f"{c.failures} problem(s) found" if c.failures else "all checks passed")
    return EXIT_FAIL if c.failures else EXIT_OK
