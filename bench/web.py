"""The dashboard's cost: page latency over a large spool, and the forwarding benchmark with the overview open.

1. Latency: a spool with --sent files in sent/ (100,000 by default) and --failed files with sidecars in
   failed/, a real daemon serving the dashboard (an operator logged in), and every page and API answer asked
   --rounds times, each time after the dashboard's one-second cache expired (so every answer is computed),
   with --history records (1,000,000) in the delivery history.
   The issue's bound: every page under 200 ms.
2. Overview open: bench/benchmark.py's relaypacsd drain against a real Orthanc, alternately with the
   dashboard off and with it on and the overview "open" (what the page asks every 3 s: /api/status and
   /api/charts, from a poller here; --browser opens the real page in headless Chromium instead, whose own CPU
   then competes on this machine). The issue's bound: under 5 % lost.

    .venv/bin/python bench/web.py                       # both parts (about 2 minutes)
    .venv/bin/python bench/web.py --sent 20000 --counts 500 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402  (bench/benchmark.py: the drain, the Orthanc, the CPU reader)

from relaypacsd.localorthanc import LocalOrthanc, free_port  # noqa: E402
from relaypacsd.web.users import User, hash_password, write_users  # noqa: E402

PAGES = ["/", "/failed", "/config", "/api/status", "/api/charts?span=hour", "/api/charts?span=day",
         "/api/failed", "/api/config", "/healthz", "/history", "/api/history", "/api/history?study=1.2.826.0.1.3680043.10.4242",
         "/api/history?patient=P04242", "/api/history?outcome=failed&pacs=orthanc", "/timeline?study=1.2.826.0.1.3680043.10.4242",
         "/api/history?study=1.2.826.0.1.3680043.10.4242&limit=0", "/api/history?format=csv"]
PASSWORD = "bench-operator-password"


def fill(spool: Path, sent: int, failed: int) -> None:
    """`sent` empty files in sent/ (a thousand per folder), `failed` files in failed/ with a sidecar each."""
    for i in range(sent):
        folder = spool / "sent" / f"study{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(folder / f"img{i:06d}.dcm", os.O_CREAT | os.O_WRONLY, 0o644))
    (spool / "failed").mkdir(parents=True, exist_ok=True)
    for i in range(failed):
        path = spool / "failed" / f"bad{i:05d}.dcm"
        path.write_bytes(b"x")
        (spool / "failed" / f"bad{i:05d}.dcm.error.json").write_text(json.dumps({
            "reason": f"orthanc: refused (case {i})", "stage": "delivery", "time": "2026-12-01T10:00:00+00:00",
            "next_step": "fix the cause, then retry", "pacs": {"orthanc": {"state": "failed", "reason_code": "0xC122"}}}))


def fill_history(state_dir: Path, n: int) -> None:
    """`n` delivery history records: 10,000 studies of 100 instances, one record each (a few failed)."""
    from relaypacsd.history import HistoryRecord
    from relaypacsd.journal import open_journal

    journal = open_journal(state_dir)
    now = time.time()
    try:
        batch = []
        for i in range(n):
            study = i % 10_000
            batch.append(HistoryRecord(now - (n - i) * 0.03, watch="/srv/ct", file=f"S{study}/IM{i:07d}.dcm",
                                       sop_instance_uid=f"1.2.826.0.1.3680043.11.{i}",
                                       study_instance_uid=f"1.2.826.0.1.3680043.10.{study}",
                                       series_instance_uid=f"1.2.826.0.1.3680043.12.{study}",
                                       patient_id=f"P{study:05d}", accession_number=f"A{study:06d}", modality="CT",
                                       destination="orthanc", outcome="failed" if i % 997 == 0 else "delivered",
                                       status_code=200, bytes=40_000, attempt=1, duration_ms=12.0))
            if len(batch) == 20_000:
                journal.record_history(batch)
                batch = []
        journal.record_history(batch)
    finally:
        journal.close()


def start(work: Path, web: str, extra: str = "") -> tuple[subprocess.Popen[bytes], str]:
    cfg = work / "relaypacs.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{work / "state"}"\nlog_level = "WARNING"\n{web}\n'
                   f'[[watch]]\npath = "{work / "spool"}"\n{extra}')
    proc = subprocess.Popen([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "run"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    return proc, str(cfg)


def login(base: str) -> requests.Session:
    s = requests.Session()
    deadline = time.monotonic() + 60
    while True:
        try:
            form = s.get(base + "/login", timeout=5)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    r = s.post(base + "/login", data={"name": "bench", "password": PASSWORD, "csrf": token}, allow_redirects=False)
    assert r.status_code == 303, r.text
    return s


def latency(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    work = tmp / "latency"
    spool = work / "spool"
    t0 = time.monotonic()
    fill(spool, args.sent, args.failed)
    print(f"spool: {args.sent} files in sent/, {args.failed} in failed/ (made in {time.monotonic() - t0:.1f} s)")
    if args.history:
        t0 = time.monotonic()
        fill_history(work / "state", args.history)
        print(f"history: {args.history} records (written in {time.monotonic() - t0:.1f} s)")
    users = work / "users.json"
    write_users(users, {"bench": User("bench", "operator", hash_password(PASSWORD))})
    port = free_port()
    proc, _ = start(work, f'[web]\nport = {port}\nusers_file = "{users}"\n')
    base = f"http://127.0.0.1:{port}"
    times: dict[str, list[float]] = {p: [] for p in PAGES}
    try:
        s = login(base)
        t0 = time.monotonic()
        while s.get(base + "/api/status").json()["watch"][0]["sent"] != args.sent:  # the first walk of sent/
            time.sleep(0.1)
        print(f"daemon counted sent/ in the background: {time.monotonic() - t0:.2f} s after the login")
        for _ in range(args.rounds):
            time.sleep(1.05)  # past the dashboard's cache: every answer below is computed afresh
            for page in PAGES:
                started = time.perf_counter()
                r = s.get(base + page)
                times[page].append((time.perf_counter() - started) * 1000)
                assert r.status_code == 200, (page, r.status_code)
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"\n| page | median ms | max ms | over {args.rounds} rounds, cache expired |\n|---|---:|---:|---|")
    for page, ms in times.items():
        print(f"| `{page}` | {statistics.median(ms):.1f} | {max(ms):.1f} | |")
    return times


class Poller:
    """What an open overview asks: /api/status and /api/charts every 3 s (or the real page in Chromium)."""

    def __init__(self, base: str, browser: bool):
        self.base, self.browser = base, browser
        self.stop = threading.Event()
        self.asked = 0
        self._chromium: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        while not self.stop.is_set():
            try:
                requests.get(self.base + "/healthz", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
        if self.browser:
            self._chromium = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                                               "--remote-debugging-port=0", self.base + "/"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.stop.wait()
            self._chromium.terminate()
            self._chromium.wait(10)
            return
        s = requests.Session()
        while not self.stop.is_set():
            try:
                s.get(self.base + "/api/status", timeout=5)
                s.get(self.base + "/api/charts?span=hour", timeout=5)
            except requests.ConnectionError:  # the drain is over and the daemon stopped
                return
            self.asked += 1
            self.stop.wait(3.0)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(15)


def overview_open(args: argparse.Namespace, tmp: Path) -> None:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp  # as benchmark.py: the PACS's disk is not measured
    folder = Path(tempfile.mkdtemp(prefix="relaypacs-web-bench-", dir=shm))
    orthanc = LocalOrthanc(folder / "orthanc")
    orthanc.start()
    plain_config = benchmark.daemon_config
    results: dict[str, list[tuple[float, float]]] = {"dashboard off": [], "overview open": []}
    try:
        for count in args.counts:
            paths = benchmark.generate(tmp / f"files-{count}", count)
            for r in range(args.rounds):
                for mode in results:
                    work = tmp / f"drain-{count}-{r}-{mode.replace(' ', '-')}"
                    port = free_port()
                    poller = None
                    if mode == "overview open":
                        def with_web(o: LocalOrthanc, w: Path, log_level: str = "WARNING", _port: int = port) -> Path:
                            cfg = plain_config(o, w, log_level)
                            cfg.write_text(cfg.read_text().replace("[[watch]]", f"[web]\nport = {_port}\n[[watch]]"))
                            return cfg
                        benchmark.daemon_config = with_web
                        poller = Poller(f"http://127.0.0.1:{port}", args.browser).start()
                    else:
                        benchmark.daemon_config = plain_config
                    try:
                        total, _first, cpu_ms = benchmark.run_relaypacsd(orthanc, paths, work)
                    finally:
                        if poller is not None:
                            poller.close()
                    orthanc.reset()
                    results[mode].append((count / total, cpu_ms))
                    print(f"{count} instances, round {r + 1}, {mode}: {count / total:.0f}/s, "
                          f"daemon CPU {cpu_ms:.2f} ms per file")
    finally:
        benchmark.daemon_config = plain_config
        orthanc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    off = statistics.median(rate for rate, _ in results["dashboard off"])
    on = statistics.median(rate for rate, _ in results["overview open"])
    cpu_off = statistics.median(c for _, c in results["dashboard off"])
    cpu_on = statistics.median(c for _, c in results["overview open"])
    print(f"\n| dashboard | instances/s (median) | daemon CPU per file |\n|---|---:|---:|\n"
          f"| off | {off:.0f} | {cpu_off:.2f} ms |\n| overview open ({'Chromium' if args.browser else 'poller'}) | "
          f"{on:.0f} ({(on / off - 1) * 100:+.1f} %) | {cpu_on:.2f} ms |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sent", type=int, default=100_000, help="files in sent/ for the latency part")
    parser.add_argument("--history", type=int, default=1_000_000, help="delivery history records (0: none)")
    parser.add_argument("--failed", type=int, default=500, help="files in failed/ for the latency part")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each part")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000], help="instances per drain")
    parser.add_argument("--browser", action="store_true", help="open the overview in headless Chromium")
    parser.add_argument("--only", choices=["latency", "overview"], help="run one part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relaypacs-web-bench-") as tmp:
        if args.only != "overview":
            latency(args, Path(tmp))
        if args.only != "latency":
            overview_open(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
