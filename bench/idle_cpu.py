#!/usr/bin/env python3
"""CPU of an idle relaypacsd: the real daemon, a real local Orthanc as its PACS, default intervals.

    .venv/bin/python bench/idle_cpu.py              # 60 s
    .venv/bin/python bench/idle_cpu.py --seconds 20

Starts Orthanc (relaypacsd/localorthanc.py) and `relaypacsd run` with the default settings (native inotify
observer, probe every 30 s), waits until the daemon is ready, reads utime + stime of its process from
/proc/PID/stat at the start and the end of the window and prints the clock ticks and the share of one core.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark import cpu_seconds, daemon_config  # noqa: E402  (this folder is on sys.path when a script here runs)
from relaypacsd.localorthanc import LocalOrthanc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window (default 60)")
    args = parser.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="relaypacs-idle-") as tmp:
        work = Path(tmp)
        with LocalOrthanc(work / "orthanc") as orthanc:
            cfg = daemon_config(orthanc, work, log_level="INFO")  # INFO: the "relaypacsd ready" line
            log = open(work / "daemon.log", "wb")
            proc = subprocess.Popen([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "run"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                deadline = time.monotonic() + 30
                while b"relaypacsd ready" not in (work / "daemon.log").read_bytes():
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("daemon did not start: " + (work / "daemon.log").read_text()[-2000:])
                    time.sleep(0.1)
                time.sleep(2.0)  # start-up work (imports, the first probe) is not idle time
                before, started = cpu_seconds(proc.pid), time.monotonic()
                time.sleep(args.seconds)
                used, elapsed = cpu_seconds(proc.pid) - before, time.monotonic() - started
            finally:
                proc.terminate()
                proc.wait(30)
                log.close()
    ticks = round(used * hz)
    share = 100.0 * used / elapsed
    print(f"idle relaypacsd: {ticks} ticks (1/{hz} s) in {elapsed:.0f} s = {share:.2f} % of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
