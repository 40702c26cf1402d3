#!/usr/bin/env python3
"""Where the daemon's CPU goes per file: py-spy samples the real daemon over one drain, and each sample is
put in one of the stages of the README's profile table.

    .venv/bin/python bench/profile.py                 # 2,000 CT instances, a folder renamed into inbox/
    .venv/bin/python bench/profile.py --count 500 --keep /tmp/prof   # keep the raw stacks to read

The layout is bench/benchmark.py's issue #15 one: a private Orthanc on 127.0.0.1 with its storage in
/dev/shm, the files copied into a folder beside inbox/ and renamed into it at once, the daemon with default
settings (a subprocess). py-spy (`py-spy record --format raw --nonblocking`) samples only threads that run
(idle waits are not CPU), 250 times a second by default; a sample's stage is that of the innermost frame that names
one (see STAGES). The daemon's own CPU per file (utime + stime) is printed beside it, so the sampled shares
can be read as microseconds per file. py-spy's own sampling costs the daemon a little: compare CPU per
file with bench/benchmark.py's, not with this.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.benchmark import SETTLE_SECONDS, cpu_seconds, daemon_config, generate  # noqa: E402
from relaypacsd.localorthanc import LocalOrthanc  # noqa: E402

# (stage, markers): a frame belongs to the first stage one of whose markers is in "function (file)"
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("answer parsing", ("dicomjson.py", "outcomes.py", "parse_answer", "_answer", "json/", "iter_content",
                        "_read_status", "getresponse", "begin (http/client", "read (http/client")),
    ("request building", ("multipart", "_body", "prepare_", "models.py", "sessions.py", "adapters.py",
                          "connectionpool.py", "urllib3", "http/client", "socket.py", "ssl.py")),
    ("journal", ("journal_", "sqlite_", "history_sqlite", "records.py", "tally.py", "sqlite3")),
    ("validation", ("dicomfile.py", "validation.py", "archive.py", "pydicom", "routing.py", "hashlib")),
    ("claim and moves", ("spool.py", "finishing.py", "folders.py", "fsync", "rename", "recovery.py")),
    ("watching", ("watcher.py", "intake.py", "scanning.py", "watchdog", "inotify", "fnmatch", "untracked.py")),
    ("scheduling", ("queues.py", "grouping.py", "batches.py", "delivery.py", "senders.py", "window.py",
                    "apscheduler", "threading.py", "queue.py", "concurrent/", "daemon.py", "jobs.py")),
]


def stage_of(stack: list[str]) -> str:
    """The stage of one sample: its innermost frame that names one (frames are listed outermost first)."""
    for frame in reversed(stack):
        for stage, markers in STAGES:
            if any(m in frame for m in markers):
                return stage
    return "other (start, logging, heartbeat, metrics)"


def read_samples(raw: Path) -> collections.Counter[str]:
    """Samples per stage from py-spy's raw (collapsed) output: 'frame;frame;... count' per line."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[stage_of(stack.split(";"))] += int(n)
    return counts


def user_system(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--keep", type=Path, help="also write py-spy's raw stacks here")
    parser.add_argument("--routes", type=int, default=0, metavar="N", help="the daemon with N [[route]] tables "
                        "(bench/benchmark.py's: N-1 that the files fail, then a default)")
    parser.add_argument("--all-threads", action="store_true", help="sample every running thread, not only the "
                        "one holding the GIL (counts GIL waits and system calls as well)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="relaypacs-prof-") as tmp, \
            tempfile.TemporaryDirectory(prefix="relaypacs-prof-pacs-", dir=shm) as pacs_tmp:
        work = Path(tmp)
        paths = generate(work / "files", args.count)
        with LocalOrthanc(Path(pacs_tmp) / "orthanc") as orthanc:
            cfg = daemon_config(orthanc, work / "relay", routes=args.routes)
            proc = subprocess.Popen([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "run"],
                                    stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
            try:
                spool = work / "relay" / "spool"
                while not (work / "relay" / "state" / "heartbeat.json").exists():
                    if proc.poll() is not None:
                        raise RuntimeError("daemon did not start: " + (work / "daemon.log").read_text()[-2000:])
                    time.sleep(0.05)
                stage = spool / "stage"
                stage.mkdir()
                for p in paths:
                    shutil.copyfile(p, stage / p.name)
                os.sync()
                raw = work / "stacks.txt"
                GIL = [] if args.all_threads else ["--gil"]
                spy = subprocess.Popen([py_spy, "record", "--pid", str(proc.pid), "--rate", str(args.rate), "--format", "raw",
                                        *GIL, "--nonblocking", "--output", str(raw)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches
                cpu_before, split_before = cpu_seconds(proc.pid), user_system(proc.pid)
                started = time.perf_counter()
                os.rename(stage, spool / "inbox" / "burst")
                done = spool / "sent" / "burst"
                while not done.exists() or len(os.listdir(done)) < args.count:
                    time.sleep(0.01)
                elapsed = time.perf_counter() - started - SETTLE_SECONDS
                cpu_ms = (cpu_seconds(proc.pid) - cpu_before) * 1000 / args.count
                user_ms, system_ms = (1000 * (b - a) / args.count
                                      for a, b in zip(split_before, user_system(proc.pid)))
                spy.send_signal(2)  # SIGINT: py-spy writes its output and stops
                spy.wait(timeout=60)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        if args.keep:
            shutil.copyfile(raw, args.keep)
        counts = read_samples(raw)
    total = sum(counts.values()) or 1
    print(f"{args.count} files in {elapsed:.2f} s (settle credited); daemon CPU {cpu_ms:.3f} ms per file; "
          f"(user {user_ms:.3f}, system {system_ms:.3f}); {total} samples (the settle wait and py-spy's start included: shares, not times)")
    print("| stage | share of samples | µs per file |")
    print("|---|---:|---:|")
    for name, n in counts.most_common():
        print(f"| {name} | {100 * n / total:.1f} % | {cpu_ms * 1000 * n / total:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
