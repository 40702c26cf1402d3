"""Several real gateways on one spool: each daemon a subprocess seeing the share through its own bindfs view
(another mount path, no inotify, link+unlink moves as on NFS), one real PostgreSQL journal, one real Orthanc
that counts every instance it receives (a Lua filter writes each SOP Instance UID to a file)."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from relaypacsd.localorthanc import LocalOrthanc
from relaypacsd.watcher import filesystem_type
from tests.integration.daemon_helpers import daemon_log, start_daemon, wait_for, wait_ready, write_config

COUNTER = """
-- Every instance Orthanc receives (stored or already there), one SOP Instance UID per line.
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("{path}", "a")
  f:write(dicom.SOPInstanceUID .. "\\n")
  f:close()
  return true
end
"""
LEASE = 3.0  # seconds: short, so that takeovers happen within the tests' time


class CountingOrthanc:
    """A real Orthanc that writes down each instance it receives; it can go away and come back on its ports."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.counts = workdir / "received.txt"
        lua = workdir / "count.lua"
        workdir.mkdir(parents=True, exist_ok=True)
        lua.write_text(COUNTER.format(path=self.counts))
        self.extra = {"LuaScripts": [str(lua)]}
        self.server = LocalOrthanc(workdir / "orthanc", extra=self.extra)

    def start(self) -> "CountingOrthanc":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(timeout=0)

    def restart(self) -> None:
        """Back on the same ports (the daemons' config names them), with what it had stored."""
        old = self.server
        self.server = LocalOrthanc(self.workdir / "orthanc", http_port=old.http_port, dicom_port=old.dicom_port,
                                   password=old.password, extra=self.extra)
        self.server.start()

    def received(self) -> collections.Counter[str]:
        """How many times each SOP Instance UID arrived."""
        try:
            return collections.Counter(self.counts.read_text().split())
        except FileNotFoundError:
            return collections.Counter()


def counting_pacs(tmp_path: Path) -> Iterator[CountingOrthanc]:
    """Start a CountingOrthanc (FAIL under CI=true when Orthanc is missing); stop it after."""
    from tests.integration.conftest import _not_installed
    from relaypacsd.localorthanc import OrthancNotInstalled

    server = CountingOrthanc(tmp_path / "pacs")
    try:
        server.start()
    except OrthancNotInstalled as exc:
        _not_installed(exc)
    try:
        yield server
    finally:
        server.stop()


class Share:
    """A backing folder (the file server) and one bindfs view of it per node."""

    def __init__(self, base: Path):
        self.real = base / "real"
        self.real.mkdir(parents=True)
        self.views: list[Path] = []

    def view(self, name: str) -> Path:
        view = self.real.parent / f"mnt-{name}"
        view.mkdir()
        subprocess.run(["bindfs", "--no-allow-other", str(self.real), str(view)], check=True, timeout=30)
        self.views.append(view)
        assert wait_for(lambda: filesystem_type(view).startswith("fuse"), timeout=10)
        return view

    def unmount(self) -> None:
        for view in self.views:
            subprocess.run(["fusermount", "-u", str(view)], timeout=30, check=False)
            if os.path.ismount(view):
                subprocess.run(["umount", "-l", str(view)], timeout=30, check=False)

    @property
    def spool(self) -> Path:
        return self.real / "spool"


def share_views(tmp_path: Path) -> Iterator[Share]:
    """A Share (FAIL under CI=true when bindfs is missing); its views unmounted after."""
    if not shutil.which("bindfs") or not os.path.exists("/dev/fuse"):
        if os.environ.get("CI") == "true":
            pytest.fail("bindfs/FUSE missing: apt-get install -y bindfs fuse3", pytrace=False)
        pytest.skip("bindfs/FUSE missing")
    found = Share(tmp_path / "share")
    try:
        yield found
    finally:
        found.unmount()


def node_config(tmp_path: Path, name: str, view: Path, orthanc: CountingOrthanc, journal: dict[str, Any],
                **delivery: Any) -> Path:
    """One node's config: its own state dir and log; the share through its own view; the shared journal."""
    home = tmp_path / name
    home.mkdir(parents=True, exist_ok=True)
    return write_config(
        home, orthanc.server, path=home / "relaypacs.toml",
        daemon={"node": name, "lease_seconds": LEASE, "heartbeat_interval": 0.5},
        journal=journal,
        delivery={"batch_max_instances": 10, "workers_per_pacs": 2, "retry_attempts": 2, **delivery},
        watch=[{"path": str(view / "spool"), "name": "spool", "observer": "auto", "settle_seconds": 0.3,
                "poll_interval": 0.3, "rescan_interval": 1.0}])


def start_nodes(configs: list[Path]) -> list[Any]:
    """Start each node and wait until it is ready."""
    procs = [start_daemon(cfg) for cfg in configs]
    for proc in procs:
        wait_ready(proc, timeout=30)
    return procs


def drop(share: Share, count: int, prefix: str = "img") -> list[str]:
    """`count` files written straight into the file server's inbox (as a modality on another host writes)."""
    from tests.dicomfactory import write_study

    _, sops = write_study(share.spool / "inbox" / f"{prefix}-{time.monotonic_ns()}", count, prefix=prefix)
    return sops


def folder_files(share: Share, folder: str) -> list[Path]:
    base = share.spool / folder
    return sorted(p for p in base.rglob("*") if p.is_file() and not p.name.endswith(".error.json")) if base.exists() \
        else []


def all_sent(share: Share, n: int, procs: list[Any], timeout: float = 90) -> None:
    """Wait until `n` files are in sent/; fail with the nodes' logs."""
    wait_for(lambda: len(folder_files(share, "sent")) >= n, timeout=timeout, interval=0.3,
             message=lambda: f"{len(folder_files(share, 'sent'))} in sent/, "
                             f"{len(folder_files(share, 'sending'))} in sending/, "
                             f"{len(folder_files(share, 'inbox'))} in inbox/\n" +
                             "\n".join(daemon_log(p)[-2500:] for p in procs))


def assert_each_file_once(share: Share, n: int) -> None:
    """Every file in exactly one folder: n in sent/ under n distinct names, nothing left anywhere else."""
    sent = folder_files(share, "sent")
    names = {p.relative_to(share.spool / "sent").as_posix() for p in sent}
    # On failure, what is odd: names that are not plain instance files (a~1.dcm: a second copy), and the count.
    odd = sorted(name for name in names if "~" in name or not name.endswith(".dcm"))
    assert len(sent) == n and len(names) == n, f"{len(sent)} in sent/ for {n}; odd names: {odd[:20]}"
    for folder in ("inbox", "sending", "failed"):
        assert folder_files(share, folder) == [], folder


def log_lines(proc: Any, words: str) -> list[str]:
    return [line for line in daemon_log(proc).splitlines() if words in line]
