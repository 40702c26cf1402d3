"""A private PostgreSQL for the tests: initdb and pg_ctl in a temporary directory, 127.0.0.1 only.

Debian's `postgresql` package puts its binaries in /usr/lib/postgresql/<version>/bin (not on PATH). initdb
refuses to run as root: as root, the server runs as the package's `postgres` user in a directory it owns.
`stop("immediate")` is the crash of the "PostgreSQL away" tests; `start()` brings it back on the same port.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from relaypacsd.localorthanc import free_port
from relaypacsd.loopback import check_listening

INSTALL_HINT = "apt-get install -y postgresql"
USER = "relaypacs"


class PostgresNotInstalled(RuntimeError):
    """No initdb/pg_ctl here (or no postgres user to run them as root)."""


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    if which:
        return Path(which).parent
    raise PostgresNotInstalled(f"pg_ctl not found; install it with: {INSTALL_HINT}")


class LocalPostgres:
    """One private cluster: its data, log and socket in a temp dir; trust auth unless a password is given."""

    def __init__(self, password: str | None = None):
        self.bindir = _bindir()
        self.password = password
        self.port = 0
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotInstalled(f"no 'postgres' user to run the server as; {INSTALL_HINT}") from None
            self._as = ["runuser", "-u", "postgres", "--"]
        # Not below pytest's tmp_path: as root its folders are 0700 root, which the postgres user cannot enter.
        self.dir = Path(tempfile.mkdtemp(prefix="relaypacs-pg-"))
        if self._as:
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"

    @property
    def url(self) -> str:
        """postgresql://relaypacs@127.0.0.1:PORT/relaypacs (no password in it)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/relaypacs"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False)

    def init(self) -> "LocalPostgres":
        """initdb (once), then start, then create the database."""
        auth = ["-A", "trust"]
        if self.password is not None:
            pwfile = self.dir / "pw"
            pwfile.write_text(self.password + "\n")
            if self._as:
                shutil.chown(pwfile, "postgres")
            auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"]
        done = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, *auth, "--no-sync")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr[-2000:]}")
        self.port = free_port()
        self.start()
        env = {**os.environ, "PGPASSWORD": self.password or ""}
        made = subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
                               "relaypacs"], capture_output=True, text=True, timeout=60, env=env)
        if made.returncode:
            raise RuntimeError(f"createdb failed: {made.stderr}")
        return self

    def start(self) -> None:
        """Start (or start again) on the same port; fsync off: the data is throwaway."""
        options = f"-k {self.dir} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off -c full_page_writes=off"
        done = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
                         "-t", "60", "-o", options, "start")
        if done.returncode:
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{self.log_tail()}")
        check_listening(self.pid(), {self.port})

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m MODE ('immediate' is a crash: no shutdown checkpoint, clients cut)."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def pid(self) -> int:
        """The postmaster's process id."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def psql(self, sql: str) -> str:
        """Run SQL through psql as the test user; its output."""
        env = {**os.environ, "PGPASSWORD": self.password or ""}
        done = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d",
                               "relaypacs", "-At", "-c", sql], capture_output=True, text=True, timeout=60, env=env)
        if done.returncode:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def reset(self) -> None:
        """Drop every table: the next journal opened starts empty."""
        self.psql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / "log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def destroy(self) -> None:
        """Stop and remove everything."""
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
