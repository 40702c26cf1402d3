"""A real rsyslogd as the audit repository of the tests: private config and directory, loopback only, TCP, UDP,
TLS and mutual-TLS inputs, every message written raw, one per line, to a file the tests read back."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from relaypacsd.localorthanc import free_port

RSYSLOGD = "/usr/sbin/rsyslogd"  # Debian's; sbin may be missing from a user's PATH
INSTALL_HINT = "apt-get install -y rsyslog rsyslog-gnutls"
# RFC 5424 HEADER as audit_syslog writes it, then STRUCTURED-DATA "-", then the MSG.
FRAME = re.compile(rb"<(?P<pri>\d+)>1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) - "
                   rb"(?P<msg>.*)", re.S)
_LOOPBACK_HEX = "0100007F"  # 127.0.0.1 in /proc/net/{tcp,udp}


class RsyslogNotInstalled(RuntimeError):
    """rsyslogd (or openssl, for the TLS certificates) is missing."""


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bound(table: str, port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/`table` writes them) bound to `port` (TCP: listening)."""
    found = set()
    for name in (table, table + "6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            addr, hexport = f[1].rsplit(":", 1)
            if int(hexport, 16) == port and (not table.startswith("tcp") or f[3] == "0A"):
                found.add(addr)
    return found


def _listening(table: str, port: int) -> bool:
    """True when `port` is bound on 127.0.0.1; AssertionError when it is bound anywhere else too."""
    found = _bound(table, port)
    assert found <= {_LOOPBACK_HEX}, f"rsyslogd is bound beyond loopback on {table} port {port}: {found}"
    return _LOOPBACK_HEX in found


class LocalRsyslog:
    """rsyslogd in the foreground with its config, work dir and output file under `workdir`.

    The ports are chosen at the first start and kept: stop() then start() is the repository going away and
    coming back at the same address."""

    def __init__(self, workdir: Path, certs: Path | None = None):
        """`certs`: a folder of certificates made by make_certificates (made in `workdir` when not given)."""
        self.workdir = workdir
        self.certs = certs or workdir
        self.output = workdir / "audit.log"
        self.ca = self.certs / "ca.pem"
        self.tcp_port = self.udp_port = self.tls_port = self.mtls_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def udp_url(self) -> str:
        return f"udp://127.0.0.1:{self.udp_port}"

    @property
    def tls_url(self) -> str:
        return f"tls://127.0.0.1:{self.tls_port}"

    @property
    def mtls_url(self) -> str:
        """The TLS input that wants a client certificate signed by `ca` (mutual TLS, as ATNA repositories do)."""
        return f"tls://127.0.0.1:{self.mtls_port}"

    @property
    def client_cert(self) -> Path:
        """A client certificate (and its key, in the same PEM) that the mutual-TLS input accepts."""
        return self.certs / "client.pem"

    def url(self, scheme: str) -> str:
        """The URL of one input: tcp, udp or tls."""
        return {"tcp": self.tcp_url, "udp": self.udp_url, "tls": self.tls_url}[scheme]

    def start(self, timeout: float = 15.0) -> "LocalRsyslog":
        """Start rsyslogd and wait until its three inputs listen on 127.0.0.1."""
        binary = shutil.which("rsyslogd") or (RSYSLOGD if os.access(RSYSLOGD, os.X_OK) else None)
        if binary is None:
            raise RsyslogNotInstalled(f"rsyslogd not found; install it with: {INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.ca.exists():
            make_certificates(self.certs)
        fixed = bool(self.tcp_port)
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.tcp_port, self.udp_port = free_port(), _free_udp_port()
                self.tls_port = self.mtls_port = self.tcp_port
                while self.tls_port == self.tcp_port:
                    self.tls_port = free_port()
                while self.mtls_port in (self.tcp_port, self.tls_port):
                    self.mtls_port = free_port()
            if self._launch(binary, timeout):
                return self
            self.stop()
        raise RuntimeError(f"rsyslogd did not listen on 127.0.0.1 ports {self.tcp_port}/{self.udp_port}/"
                           f"{self.tls_port}/{self.mtls_port}:\n{self.log_tail()}")

    def _launch(self, binary: str, timeout: float) -> bool:
        conf = self.workdir / "rsyslog.conf"
        w, c = self.workdir, self.certs
        conf.write_text(f"""
global(workDirectory="{w}" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{c}/ca.pem" defaultNetstreamDriverCertFile="{c}/server.pem"
       defaultNetstreamDriverKeyFile="{c}/server.key")
module(load="imtcp")
module(load="imudp")
input(type="imtcp" port="{self.tcp_port}" address="127.0.0.1")
input(type="imtcp" port="{self.tls_port}" address="127.0.0.1" streamDriver.name="gtls" streamDriver.mode="1"
      streamDriver.authMode="anon")
input(type="imtcp" port="{self.mtls_port}" address="127.0.0.1" streamDriver.name="gtls" streamDriver.mode="1"
      streamDriver.authMode="x509/certvalid")
input(type="imudp" port="{self.udp_port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{self.output}" template="raw")
""")
        with open(self.workdir / "rsyslogd.out", "ab") as out:
            self._proc = subprocess.Popen([binary, "-n", "-f", str(conf), "-i", str(self.workdir / "rsyslogd.pid")],
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.workdir,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if (all(_listening("tcp", p) for p in (self.tcp_port, self.tls_port, self.mtls_port))
                    and _listening("udp", self.udp_port)):
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop rsyslogd (SIGTERM; SIGKILL after `timeout`); its file stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        (self.workdir / "rsyslogd.pid").unlink(missing_ok=True)

    def lines(self) -> list[bytes]:
        """Every message rsyslog wrote so far, raw."""
        try:
            return [line for line in self.output.read_bytes().split(b"\n") if line]
        except FileNotFoundError:
            return []

    def frames(self) -> list[re.Match[bytes]]:
        """The messages written so far, parsed as RFC 5424 (AssertionError for one that is not)."""
        found = []
        for line in self.lines():
            m = FRAME.fullmatch(line)
            assert m, f"not an RFC 5424 frame: {line[:200]!r}"
            found.append(m)
        return found

    def log_tail(self) -> str:
        try:
            return (self.workdir / "rsyslogd.out").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""


def make_certificates(w: Path) -> None:
    """A private CA, a server certificate for 127.0.0.1 (the TLS inputs) and a client certificate (mutual TLS),
    made with openssl in `w`; EC keys, which take milliseconds where RSA takes a second on a busy machine."""
    if shutil.which("openssl") is None:
        raise RsyslogNotInstalled("openssl not found (TLS test certificates); install it with: apt-get install -y openssl")
    w.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=w, check=True, capture_output=True)

    def sign(name: str, subject: str, *extra: str) -> None:
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{name}.crt", "-days", "2", *extra)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=relaypacsd test audit CA")
    (w / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sign("server", "/CN=127.0.0.1", "-extfile", "san.cnf")
    (w / "server.crt").rename(w / "server.pem")
    sign("client", "/CN=relaypacsd test gateway")
    (w / "client.pem").write_bytes((w / "client.crt").read_bytes() + (w / "client.key").read_bytes())
    for key in ("ca.key", "server.key", "client.key", "client.pem"):
        os.chmod(w / key, 0o600)
