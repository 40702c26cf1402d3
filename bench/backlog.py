#!/usr/bin/env python3
"""A backlog: N files waiting in sending/ while the PACS is away; the daemon's memory, then the drain.

    nice .venv/bin/python bench/backlog.py                   # 1,000,000 files (about 4 GB in /dev/shm, minutes)
    .venv/bin/python bench/backlog.py --files 100000         # a quicker look
    .venv/bin/python bench/backlog.py --files 100000 --python /work/main/.venv/bin/python   # another checkout
    nice .venv/bin/python bench/backlog.py --postgres                                        # the shared journal
    .venv/bin/python bench/backlog.py --journal-url postgresql://relaypacs@db/relaypacs      # an existing one

1. N small CT instances (2 KB each, 500 to a study folder) are written straight into sending/, as a crashed
   or stopped gateway leaves them: one file made with pydicom, then copied with a new SOPInstanceUID (and a
   study UID per folder) written at fixed offsets, so each file is its own instance and a million take a
   minute or two. On /dev/shm when it has room (the spool's disk is not what is measured), else a temp dir.
2. A private Orthanc is started to learn its ports, then stopped: the PACS is away.
3. The real daemon (`relaypacsd run`, default settings but `--health-interval`) starts, finds the files,
   validates and journals each. Its peak RSS (VmHWM of /proc/PID/status) is read until every file has its
   journal rows, then over one more retry sweep. With `--restart` it is stopped (SIGTERM) and started again
   with everything in the journal's backlog, and the new daemon's peak RSS is read over its start-up.
4. Orthanc starts again on the same ports. Measured: seconds until the daemon logs the PACS reachable again,
   until the first file is in sent/, and the rate over the first `--rate-seconds` of the drain (from the
   heartbeat's sent counter); with `--drain`, until every file is in sent/, and Orthanc's instance count.

The journal is SQLite in the state dir unless `--postgres` (a private PostgreSQL started as the tests start
theirs, tests/localpostgres.py: initdb and pg_ctl in a temporary directory, listening on 127.0.0.1 only, fsync
off, removed afterwards) or `--journal-url` (an existing database with no tables; the run's journal is left in it). The
daemon's RSS is measured, not the server's.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from relaypacsd.heartbeat import read_heartbeat  # noqa: E402
from relaypacsd.localorthanc import LocalOrthanc  # noqa: E402
from tests.dicomfactory import CT_SMALL  # noqa: E402

# Placeholders of one length (44 characters, as "2.25." and 39 digits), replaced in the copies at fixed offsets.
SOP0, STUDY0, SERIES0 = ("2.25." + d + "0" * 38 for d in "123")
FILE_BYTES = 4096  # what one small file costs on tmpfs or ext4 (a page or a block)


def template() -> bytes:
    """One small valid CT instance (8x8 pixels, no private tags) with the placeholder UIDs."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.remove_private_tags()
    ds.Rows = ds.Columns = 8
    ds.PixelData = bytes(8 * 8 * 2)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = SOP0
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY0, SERIES0
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def generate(folder: Path, count: int, per_study: int = 500) -> int:
    """Write `count` instances into `folder`/studyNNNNN/, each with its own SOPInstanceUID; return one's size."""
    data = bytearray(template())
    sop_at = [i for i in range(len(data)) if data.startswith(SOP0.encode(), i)]  # meta header and data set
    study_at, series_at = data.index(STUDY0.encode()), data.index(SERIES0.encode())
    run = f"{os.getpid() % 100000:05d}{int(time.time()):010d}"  # unique per run: Orthanc may keep old ones
    target = folder
    for i in range(count):
        if i % per_study == 0:
            study = i // per_study
            target = folder / f"study{study:05d}"
            target.mkdir(parents=True, exist_ok=True)
            data[study_at:study_at + 44] = f"2.25.2{run}{study:023d}".encode()
            data[series_at:series_at + 44] = f"2.25.3{run}{study:023d}".encode()
        uid = f"2.25.1{run}{i:023d}".encode()
        for at in sop_at:
            data[at:at + 44] = uid
        fd = os.open(target / f"im{i:07d}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return len(data)


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process in kB: its peak and current resident memory."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values.get("VmHWM", 0), values.get("VmRSS", 0)


def journaled(state: Path, url: str = "") -> int:
    """Files with journal rows (read-only, beside the running daemon). PostgreSQL: the rows (one PACS here, so
    a row per file), not COUNT(DISTINCT), and every 5 s: a million-row sort every second would load the server
    being measured."""
    if url:
        import psycopg

        try:
            with psycopg.connect(url, connect_timeout=5) as db:
                return int(db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])
        except psycopg.Error:
            return 0
    try:
        db = sqlite3.connect(f"file:{state / 'journal.sqlite3'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(DISTINCT path) FROM deliveries").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def log_time(log: Path, text: str) -> float | None:
    """The time (epoch) of the first log line holding `text` (loguru's local-time stamp), or None."""
    try:
        with open(log, errors="replace") as fh:
            for line in fh:
                if text in line:
                    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except (OSError, ValueError):
        pass
    return None


def pick_dir(count: int) -> str | None:
    """/dev/shm when it has room for the files (and some to spare), else the default temp dir."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize > count * FILE_BYTES * 1.5 + 2**30 else None


def write_config(work: Path, orthanc: LocalOrthanc, health: float, window: int | None, url: str = "") -> Path:
    user, password = orthanc.auth
    (work / "pw").write_text(password)
    cfg = work / "relaypacs.toml"
    window_line = f"active_window = {window}\n" if window else ""
    journal = f'[journal]\nurl = "{url}"\n' if url else ""
    cfg.write_text(f'[daemon]\nstate_dir = "{work / "state"}"\nlog_level = "INFO"\nlog_file = "{work / "daemon.log"}"\n'
                   f'heartbeat_interval = 1.0\nnode = "bench"\n{journal}[delivery]\nhealth_interval = {health}\n{window_line}'
                   f'[[watch]]\npath = "{work / "spool"}"\n'
                   f'[pacs.orthanc]\ntype = "orthanc"\nurl = "{orthanc.url}"\nusername = "{user}"\n'
                   f'password_file = "{work / "pw"}"\nconnect_timeout = 2\n')
    return cfg


class Sampler:
    """Reads the daemon's memory and heartbeat; remembers the peak."""

    def __init__(self, proc: subprocess.Popen, state: Path):
        self.proc, self.state = proc, state
        self.hwm = self.rss = 0

    def look(self) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}")
        self.hwm, self.rss = memory_kb(self.proc.pid)
        return read_heartbeat(self.state) or {}


def start_daemon(python: str, cfg: Path, work: Path) -> subprocess.Popen:
    # cwd: `python -m` puts it first on sys.path, and from a checkout it would run that checkout's relaypacsd.
    return subprocess.Popen([python, "-m", "relaypacsd", "-c", str(cfg), "run"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.err", "ab"))


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def private_postgres() -> Any:
    """A private PostgreSQL, as the tests start theirs (127.0.0.1 only, trust auth, in a temp dir)."""
    from tests.localpostgres import LocalPostgres

    return LocalPostgres().init()


def require_empty(url: str) -> None:
    """An operator's database must hold no tables: the run's journal is throwaway, and nothing is dropped."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as db:
        tables = db.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()"
                            ).fetchone()[0]
    if tables:
        raise SystemExit(f"--journal-url: the database holds {tables} table(s); give the benchmark an empty one")


def own_files(url: str, count: int, node: str = "bench", root: str = "spool", per_study: int = 500) -> None:
    """The shared journal's side of files a stopped node left in sending/: its ownership rows (a node owns what
    it claimed; files nobody owns would wait a lease and two looks of the untracked scan before any node takes
    them, which is the crash case, not this one). The tables are the daemon's own (made by opening the journal)."""
    import psycopg

    from relaypacsd.journal_pg import PgJournal

    PgJournal(url).close()
    now = time.time()
    with psycopg.connect(url, connect_timeout=5) as db:
        with db.cursor().copy("COPY owners (key, node, kind, since) FROM STDIN") as copy:
            for i in range(count):
                copy.write_row((f"{root}/sending/study{i // per_study:05d}/im{i:07d}.dcm", node, "owned", now))


def run(args: argparse.Namespace, work: Path, pacs_dir: Path, url: str = "") -> dict:
    spool = work / "spool"
    started = time.monotonic()
    size = generate(spool / "sending", args.files)
    made = time.monotonic() - started
    print(f"{args.files} files of {size} bytes written in {made:.0f} s", flush=True)
    if url:
        own_files(url, args.files)
    orthanc = LocalOrthanc(pacs_dir / "orthanc", username="relaypacs").start()
    ports, auth = (orthanc.http_port, orthanc.dicom_port), (orthanc.username, orthanc.password)
    orthanc.stop()  # the PACS is away
    cfg = write_config(work, orthanc, args.health_interval, args.window, url)
    state, log = work / "state", work / "daemon.log"
    # cwd: `python -m` puts it first on sys.path, and from a checkout it would run that checkout's relaypacsd.
    proc = start_daemon(args.python, cfg, work)
    back: LocalOrthanc | None = None
    out: dict = {"files": args.files, "journal": "PostgreSQL" if url else "SQLite"}
    try:
        look = Sampler(proc, state)
        t0 = time.monotonic()
        while journaled(state, url) < args.files:
            look.look()
            if time.monotonic() - t0 > args.timeout:
                raise RuntimeError(f"only {journaled(state, url)} of {args.files} files journaled after {args.timeout} s")
            time.sleep(5.0 if url else 1.0)
        out["taken_in_s"] = time.monotonic() - t0
        print(f"all journaled after {out['taken_in_s']:.0f} s; peak RSS so far {look.hwm / 1024:.0f} MB", flush=True)
        settle = time.monotonic() + args.settle
        while time.monotonic() < settle:  # a sweep or two with the backlog in place
            look.look()
            time.sleep(1.0)
        out["rss_waiting_mb"], out["hwm_waiting_mb"] = look.rss / 1024, look.hwm / 1024
        if args.restart:
            stop_daemon(proc)
            beat = state / "heartbeat.json"
            beat.unlink(missing_ok=True)
            t1 = time.monotonic()
            proc = start_daemon(args.python, cfg, work)
            look = Sampler(proc, state)
            while not beat.exists():
                look.look()
                time.sleep(0.1)
            out["restart_ready_s"] = time.monotonic() - t1
            settle = time.monotonic() + args.settle
            while time.monotonic() < settle:
                look.look()
                time.sleep(1.0)
            out["hwm_restart_mb"] = look.hwm / 1024
            print(f"restarted: ready after {out['restart_ready_s']:.1f} s, peak RSS {out['hwm_restart_mb']:.0f} MB",
                  flush=True)
        back = LocalOrthanc(pacs_dir / "orthanc", http_port=ports[0], dicom_port=ports[1], username=auth[0],
                            password=auth[1]).start()
        up = time.time()
        first_at = None
        base = look.look().get("sent", 0)
        while first_at is None:
            if look.look().get("sent", 0) > base or any(True for _ in os.scandir(spool / "sent")):
                first_at = time.time()
            elif time.time() - up > args.timeout:
                raise RuntimeError("nothing reached sent/ after the PACS came back")
            time.sleep(0.1)
        seen = log_time(log, "is reachable again")
        out["seen_back_s"] = (seen - up) if seen else None
        out["first_sent_s"] = first_at - up
        # The rate from the heartbeat's counter (written every second): files in sent/ per second.
        start_sent, t_start = look.look().get("sent", 0), time.time()
        time.sleep(args.rate_seconds)
        out["rate_per_s"] = (look.look().get("sent", 0) - start_sent) / (time.time() - t_start)
        out["hwm_draining_mb"] = look.hwm / 1024
        if args.drain:
            while look.look().get("sent", 0) < args.files:
                if time.time() - up > args.timeout:
                    raise RuntimeError("the drain did not finish in time")
                time.sleep(1.0)
            out["drain_s"] = time.time() - up
            out["orthanc_instances"] = back.count_instances()
        out["hwm_end_mb"] = look.hwm / 1024
    finally:
        stop_daemon(proc)
        if back is not None:
            back.stop(timeout=0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, help="delivery.active_window (default: the daemon's)")
    parser.add_argument("--health-interval", type=float, default=5.0, help="delivery.health_interval, seconds")
    parser.add_argument("--settle", type=float, default=40.0, help="seconds to wait with everything journaled")
    parser.add_argument("--rate-seconds", type=float, default=30.0, help="the drain rate is measured over this")
    parser.add_argument("--drain", action="store_true", help="wait until every file is in sent/")
    parser.add_argument("--restart", action="store_true", help="restart the daemon with the backlog in place")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--dir", help="where the spool goes (default: /dev/shm if it has room)")
    parser.add_argument("--python", default=sys.executable, help="the Python of the relaypacsd to run")
    parser.add_argument("--postgres", action="store_true", help="journal in a private PostgreSQL started for the run")
    parser.add_argument("--journal-url", default="", help="journal in this PostgreSQL (an empty database)")
    args = parser.parse_args()
    server = private_postgres() if args.postgres else None
    try:
        return measure(args, server.url if server is not None else args.journal_url, server is None)
    finally:
        if server is not None:
            server.destroy()


def measure(args: argparse.Namespace, url: str, existing: bool) -> int:
    """One run (`url`: the PostgreSQL journal, '' for SQLite; `existing`: a database of the operator's)."""
    if url and existing:
        require_empty(url)
    base = args.dir or pick_dir(args.files)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="relaypacs-backlog-", dir=base) as tmp, \
            tempfile.TemporaryDirectory(prefix="relaypacs-backlog-pacs-", dir=shm) as pacs_tmp:
        print(f"spool in {tmp}", flush=True)
        try:
            out = run(args, Path(tmp), Path(pacs_tmp), url)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a million files: before the context's own cleanup
    print()
    print(f"journal: {out['journal']}")
    print("| files waiting | peak RSS while waiting | peak RSS after the drain's start | PACS back -> daemon sees it "
          "| PACS back -> first file in sent/ | drain rate, first %.0f s |" % args.rate_seconds
          + (" whole drain | Orthanc holds |" if args.drain else ""))
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.drain else ""))
    seen = f"{out['seen_back_s']:.1f} s" if out.get("seen_back_s") is not None else "-"
    print(f"| {out['files']:,} | {out['hwm_waiting_mb']:.0f} MB | {out['hwm_draining_mb']:.0f} MB | {seen} "
          f"| {out['first_sent_s']:.1f} s | {out['rate_per_s']:.0f} files/s |"
          + (f" {out['drain_s']:.0f} s | {out['orthanc_instances']:,} |" if args.drain else ""))
    print(f"(all {out['files']:,} journaled {out['taken_in_s']:.0f} s after the start; health probe every "
          f"{args.health_interval:g} s)")
    if args.restart:
        print(f"(restarted with the backlog in place: ready after {out['restart_ready_s']:.1f} s, peak RSS "
              f"{out['hwm_restart_mb']:.0f} MB over its first {args.settle:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
