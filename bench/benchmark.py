#!/usr/bin/env python3
"""Throughput of relaypacsd against a real Orthanc, side by side with plain baselines in the same run.

    .venv/bin/python bench/benchmark.py                          # 500 and 2,000 instances, 3 rounds
    .venv/bin/python bench/benchmark.py --counts 200 --rounds 1  # a quick look
    .venv/bin/python bench/benchmark.py --routes 5               # also with five [[route]] tables (#11)
    .venv/bin/python bench/benchmark.py --other-delivery history_days=0  # beside itself without the history
    .venv/bin/python bench/benchmark.py --other-cpus 1           # beside itself on one CPU (CPUAffinity=1)

Everything runs on 127.0.0.1: a private Orthanc (DICOMweb plugin) started here, stopped at the end.
Each sender gets its own freshly generated instances (new UIDs), so nobody is timed on duplicates.
  curl loop     one `curl` process per file, STOW-RS of one instance (a shell script's way)
  raw batched   requests, STOW-RS batches of 50, 4 threads, bodies read from disk (the ceiling)
  relaypacsd    the daemon as shipped (a subprocess, default settings): files are written into
                inbox/ one by one, as a modality does; timed until all are in sent/

Two CPU layouts, both measured in the same run:
  separate  Orthanc on the last CPU, every sender (and the file writer) on the others: the shape of a
            real site, where the PACS is another machine and cannot be slowed by the gateway's CPU.
  shared    everybody on every CPU: on a small box, whatever CPU a sender spends is taken from
            Orthanc, so this measures the sender's CPU cost as much as its throughput.
Orthanc keeps its storage and index in /dev/shm (when there is one): the PACS's disk is not what is
measured here, and on one shared disk its SQLite fsyncs and the spool's fsyncs slow each other down
(on this machine's virtual disk Orthanc alone swung between 250 and 350 instances/s from run to run;
in memory it holds 420 +- 4 %). The spool and relaypacsd's journal stay on the real disk.
Two ways to drop the files into inbox/ (`--drop`):
  write     one by one, written in place and closed, as a modality does (the default);
  rename    copied beforehand into a folder beside inbox/, then that folder renamed into it at once (a
            burst: the issue #15 layout). Files of a folder moved in settle (settle_seconds) before they
            are claimed; that wait is credited, i.e. taken off relaypacsd's times.
`--fresh-orthanc` starts a new Orthanc (storage in /dev/shm) for every sender's run, so Orthanc's growing
index slows no round more than another.
Raw and relaypacsd alternate, round after round, and each figure is the median of the rounds: the
machine's own drift (other tenants, Orthanc's growing index) then falls on both alike.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relaypacsd.localorthanc import LocalOrthanc  # noqa: E402
from tests.dicomfactory import CT_SMALL, write_study  # noqa: E402


def generate(folder: Path, count: int) -> list[Path]:
    """`count` CT instances of one new study (pydicom's CT_small, new UIDs), ~39 KB each."""
    write_study(folder, count, CT_SMALL)
    return sorted(folder.glob("*.dcm"))


def multipart(paths: list[Path], boundary: str):
    for p in paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(p, "rb") as fh:
            while chunk := fh.read(262144):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def run_curl(orthanc: LocalOrthanc, paths: list[Path], work: Path) -> float:
    """One curl process per file (bodies prepared before the clock starts)."""
    boundary = "relaypacsbench"
    bodies = []
    for p in paths:
        body = work / (p.name + ".body")
        body.write_bytes(b"".join(multipart([p], boundary)))
        bodies.append(body)
    user, password = orthanc.auth
    url = orthanc.dicomweb_url + "/studies"
    started = time.perf_counter()
    for body in bodies:
        subprocess.run(["curl", "-sf", "-o", "/dev/null", "-u", f"{user}:{password}", "-X", "POST",
                        "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
                        "-H", "Accept: application/dicom+json", "--data-binary", f"@{body}", url], check=True)
    return time.perf_counter() - started


def run_raw(orthanc: LocalOrthanc, paths: list[Path], batch: int = 50, threads: int = 4) -> tuple[float, float]:
    """Batched STOW-RS with requests: 4 threads, one session each, bodies streamed with Content-Length.

    Returns (total, this process's CPU ms per file over the run: the raw sender's own cost)."""
    url = orthanc.dicomweb_url + "/studies"
    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]

    def send(chunk: list[Path]) -> None:
        boundary = uuid.uuid4().hex
        body = b"".join(multipart(chunk, boundary))
        with requests.Session() as s:
            r = s.post(url, data=body, auth=orthanc.auth, timeout=(5, 120), headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json"})
            r.raise_for_status()

    cpu_before = cpu_seconds(os.getpid())
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, batches))
    total = time.perf_counter() - started
    return total, (cpu_seconds(os.getpid()) - cpu_before) * 1000 / len(paths)


# Routes the benchmark's CT files fail, each a different kind of condition; then a default that takes them.
FAILING_ROUTES = [
    '[[route]]\nname = "research"\nmatch = { path = "glob:research/**" }\nto = ["orthanc"]\ncontinue = true\n',
    '[[route]]\nname = "mammo"\nmatch = { Modality = ["MG", "DBT"] }\nto = ["orthanc"]\n',
    '[[route]]\nname = "brains"\nmatch = { Modality = "MR", StudyDescription = "re:(?i)brain" }\nto = ["orthanc"]\n',
    '[[route]]\nname = "ultrasound"\nmatch = { StationName = "re:^US-", InstitutionName = ["A", "B"] }\n'
    'to = ["orthanc"]\n',
]


def routes_toml(n: int) -> str:
    """`n` [[route]] tables: n-1 that the CT files fail (path, list, regex, two keys), then a default."""
    if n <= 0:
        return ""
    tables = [FAILING_ROUTES[i % len(FAILING_ROUTES)] for i in range(n - 1)]
    tables = [t.replace('name = "', f'name = "r{i}-', 1) for i, t in enumerate(tables)]
    return "".join(tables) + '[[route]]\nname = "default"\nto = ["orthanc"]\n'


def daemon_config(orthanc: LocalOrthanc, work: Path, log_level: str = "WARNING", routes: int = 0,
                  delivery: dict[str, str] | None = None) -> Path:
    """A default-settings config for the real daemon: spool and state below `work`, `orthanc` its one PACS,
    and `routes` [[route]] tables (routes_toml); `delivery`: [delivery] keys set otherwise (TOML values as text)."""
    user, password = orthanc.auth
    work.mkdir(parents=True, exist_ok=True)
    (work / "pw").write_text(password)
    cfg = work / "relaypacs.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{work / "state"}"\nlog_level = "{log_level}"\n'
                   + ("[delivery]\n" + "".join(f"{k} = {v}\n" for k, v in delivery.items()) if delivery else "")
                   + f'[[watch]]\npath = "{work / "spool"}"\n'
                   f'[pacs.orthanc]\ntype = "orthanc"\nurl = "{orthanc.url}"\nusername = "{user}"\n'
                   f'password_file = "{work / "pw"}"\n' + routes_toml(routes))
    return cfg


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SETTLE_SECONDS = 2.0  # the daemon's default settle time: what a folder moved into inbox/ waits


def run_relaypacsd(orthanc: LocalOrthanc, paths: list[Path], work: Path,
                   python: str = sys.executable, drop: str = "write", routes: int = 0,
                   delivery: dict[str, str] | None = None, cpus: set[int] | None = None) -> tuple[float, float, float]:
    """Start the daemon (on `cpus` only, when given), drop the files into inbox/, time until all are in sent/.

    Returns (total, first, the daemon's CPU ms per file over the drain); with drop="rename" both times are
    net of the settle time."""
    cfg = daemon_config(orthanc, work, routes=routes, delivery=delivery)
    credit = SETTLE_SECONDS if drop == "rename" else 0.0
    # cwd: `python -m` puts it first on sys.path: run from a checkout, --compare's Python would import this
    # checkout's relaypacsd, not its own.
    # cpus: set before exec, so every thread the daemon starts inherits it (systemd's CPUAffinity= does the same)
    pinned = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen([python, "-m", "relaypacsd", "-c", str(cfg), "run"], cwd=work, preexec_fn=pinned,
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    try:
        inbox, sent = work / "spool" / "inbox", work / "spool" / "sent"
        deadline = time.monotonic() + 30
        while not (work / "state" / "heartbeat.json").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("daemon did not start: " + (work / "daemon.log").read_text()[-2000:])
            time.sleep(0.05)
        if drop == "rename":
            stage = work / "spool" / "stage"  # beside inbox/: the same filesystem, so one rename moves them all
            stage.mkdir()
            for p in paths:
                shutil.copyfile(p, stage / p.name)
            os.sync()  # their writes must not land on the clock
        cpu_before = cpu_seconds(proc.pid)
        started = time.perf_counter()
        first: list[float] = []

        def watch_first() -> None:  # the latency of the first file, measured while the others are written
            while not first and time.perf_counter() - started < 600:
                if sent.exists() and any(files for _, _, files in os.walk(sent)):
                    first.append(time.perf_counter() - started)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch_first, daemon=True)
        watcher.start()
        if drop == "rename":
            os.rename(stage, inbox / "burst")
        else:
            for p in paths:  # written in place and closed, as a modality does
                shutil.copyfile(p, inbox / p.name)
        target = len(paths)
        done = sent / "burst" if drop == "rename" else sent
        while True:
            n = len(os.listdir(done)) if done.exists() else 0  # cheap: this process shares the sender's CPU
            if n >= target:
                total = time.perf_counter() - started
                cpu_ms = (cpu_seconds(proc.pid) - cpu_before) * 1000 / target
                watcher.join(1)
                return total - credit, (first[0] if first else total) - credit, cpu_ms
            if proc.poll() is not None:
                raise RuntimeError("daemon died: " + (work / "daemon.log").read_text()[-2000:])
            # The raw sender's end is exact: poll finely once the last batches are due, coarsely before.
            time.sleep(0.002 if n >= target - 200 else 0.02)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def pin(pid: int, cpus: set[int]) -> None:
    """Put every thread of process `pid` on `cpus` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that just ended
            pass


def layouts() -> dict[str, tuple[set[int], set[int]]]:
    """CPU layout name -> (Orthanc's CPUs, the senders' CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    result = {}
    if len(cpus) >= 2:
        result["separate"] = ({cpus[-1]}, set(cpus[:-1]))
    result["shared"] = (set(cpus), set(cpus))
    return result


@dataclass
class Other:
    """A second relaypacsd run beside this one, as "other": another checkout's Python (its venv), other
    [delivery] settings, or only some CPUs; this checkout's with the default settings where not given."""

    python: str = sys.executable
    delivery: dict[str, str] | None = None
    cpus: set[int] | None = None


def measure(orthanc: LocalOrthanc, tmp: Path, count: int, rounds: int, with_curl: bool,
            other: Other | None = None, drop: str = "write",
            fresh: Callable[[], contextlib.AbstractContextManager[LocalOrthanc]] | None = None,
            routes: int = 0) -> dict[str, list[float]]:
    """Run the senders `rounds` times, alternating, each on fresh instances; return their times.

    `other`, when given, runs beside this relaypacsd; `fresh`, when given, makes a new Orthanc for each run;
    `routes`: this relaypacsd with that many [[route]] tables runs too, as "routed"."""
    times: dict[str, list[float]] = {"raw": [], "relay": [], "first": [], "cpu": [], "other": [], "other_cpu": [],
                                     "routed": [], "routed_cpu": [], "curl": [], "raw_cpu": [],
                                     "pacs_raw": [], "pacs_relay": []}
    senders = ("raw", "relay") + (("other",) if other else ()) + (("routed",) if routes else ())
    for r in range(rounds):
        for sender in senders + (("curl",) if with_curl and r == 0 else ()):
            work = tmp / f"n{count}-{sender}-{r}"
            paths = generate(work / "files", count)
            with (fresh() if fresh else contextlib.nullcontext(orthanc)) as pacs:
                _run_one(sender, pacs, paths, work, times, other, drop, routes)
            shutil.rmtree(work, ignore_errors=True)
    return times


def _run_one(sender: str, orthanc: LocalOrthanc, paths: list[Path], work: Path, times: dict[str, list[float]],
             other: Other | None, drop: str, routes: int = 0) -> None:
    """One sender's run on `orthanc`; its figures appended to `times`.

    For raw and relay, Orthanc's own CPU per instance over the run goes in too: with shared CPUs, what the
    sender costs shows there as much as in its own figure."""
    pacs_before = cpu_seconds(orthanc.pid) if orthanc.pid else 0.0
    if sender == "raw":
        total, cpu = run_raw(orthanc, paths)
        times["raw"].append(total)
        times["raw_cpu"].append(cpu)
    elif sender == "curl":
        times["curl"].append(run_curl(orthanc, paths, work))
    elif sender == "other":
        assert other is not None, "the other relaypacsd runs only when described"
        total, _first, cpu = run_relaypacsd(orthanc, paths, work, python=other.python, drop=drop,
                                            delivery=other.delivery, cpus=other.cpus)
        times["other"].append(total)
        times["other_cpu"].append(cpu)
    elif sender == "routed":
        total, _first, cpu = run_relaypacsd(orthanc, paths, work, drop=drop, routes=routes)
        times["routed"].append(total)
        times["routed_cpu"].append(cpu)
    else:
        total, first, cpu = run_relaypacsd(orthanc, paths, work, drop=drop)
        times["relay"].append(total)
        times["first"].append(first)
        times["cpu"].append(cpu)
    if sender in ("raw", "relay") and orthanc.pid:
        times[f"pacs_{sender}"].append((cpu_seconds(orthanc.pid) - pacs_before) * 1000 / len(paths))


@contextlib.contextmanager
def _fresh_orthanc(parent: Path, cpus: set[int]) -> Iterator[LocalOrthanc]:
    folder = Path(tempfile.mkdtemp(prefix="fresh-", dir=parent))
    try:
        with LocalOrthanc(folder) as orthanc:
            pin(orthanc.pid, cpus)
            yield orthanc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--rounds", type=int, default=3, help="raw and relaypacsd runs per size and layout")
    parser.add_argument("--layouts", nargs="+", choices=["separate", "shared"], default=["separate", "shared"])
    parser.add_argument("--curl-up-to", type=int, default=500, help="run the slow curl loop for sizes up to N")
    parser.add_argument("--compare", metavar="PYTHON", help="also run the relaypacsd of another checkout, by its "
                        "venv's python (e.g. an older commit's), alternating with this one")
    parser.add_argument("--drop", choices=["write", "rename"], default="write",
                        help="files written into inbox/ one by one, or a folder of them renamed into it at once")
    parser.add_argument("--fresh-orthanc", action="store_true", help="a new Orthanc (in /dev/shm) for every run")
    parser.add_argument("--routes", type=int, default=0, metavar="N", help="also run this relaypacsd with N "
                        "[[route]] tables (N-1 that the files fail, then a default), alternating with the plain one")
    parser.add_argument("--other-delivery", metavar="KEY=VALUE", action="append", default=[],
                        help="[delivery] settings of the other relaypacsd (this checkout's without --compare), e.g. "
                        "history_days=0 for the cost of the delivery history")
    parser.add_argument("--other-cpus", metavar="LIST", help="run the other relaypacsd (this checkout's without "
                        "--compare) on these CPUs only, as systemd's CPUAffinity= would, e.g. 1 or 0,1")
    args = parser.parse_args()
    other_delivery = dict(kv.split("=", 1) for kv in args.other_delivery) or None
    other_cpus = {int(c) for c in args.other_cpus.split(",")} if args.other_cpus else None
    other = Other(args.compare or sys.executable, other_delivery, other_cpus) \
        if args.compare or other_delivery or other_cpus else None
    rows = []
    everything = os.sched_getaffinity(0)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="relaypacs-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="relaypacs-bench-pacs-", dir=shm) as pacs_tmp:
        tmp_path = Path(tmp)
        with LocalOrthanc(Path(pacs_tmp) / "orthanc") as orthanc:
            try:
                for layout, (orthanc_cpus, sender_cpus) in layouts().items():
                    if layout not in args.layouts:
                        continue
                    pin(orthanc.pid, orthanc_cpus)
                    pin(os.getpid(), sender_cpus)  # the daemon and curl inherit it
                    for count in args.counts:
                        fresh = None
                        if args.fresh_orthanc:
                            fresh = functools.partial(_fresh_orthanc, Path(pacs_tmp), orthanc_cpus)
                        t = measure(orthanc, tmp_path, count, args.rounds, count <= args.curl_up_to, other,
                                    args.drop, fresh, args.routes)
                        row = {"layout": layout, "n": count, **{k: statistics.median(v) for k, v in t.items() if v}}
                        row["spread"] = min(r / x for r, x in zip(t["raw"], t["relay"])), \
                            max(r / x for r, x in zip(t["raw"], t["relay"]))
                        rows.append(row)
                        print(f"{layout} n={count}: " + "; ".join(
                            f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in t.items() if v)
                              + " (times s, *cpu and pacs_* ms per file)", flush=True)
            finally:
                pin(os.getpid(), everything)
            print(f"(Orthanc holds {orthanc.count_instances()} instances)")
    print()
    extra = " | other relaypacsd / raw | its CPU per file" if other else ""
    extra += f" | with {args.routes} routes / raw | its CPU per file" if args.routes else ""
    print("| CPUs | instances | one curl per file | raw batched STOW, 4 threads | relaypacsd inbox -> sent "
          f"| relaypacsd / raw (range) | relaypacsd / curl | daemon CPU per file | raw sender's CPU per file "
          f"| Orthanc's CPU per instance, raw / relaypacsd{extra} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if other else "")
          + ("---:|---:|" if args.routes else ""))
    for r in rows:
        n = r["n"]
        curl = f"{r['curl']:.1f} s ({n / r['curl']:.0f}/s)" if "curl" in r else "-"
        ratio_curl = f"{r['curl'] / r['relay']:.1f}x" if "curl" in r else "-"
        low, high = r["spread"]
        print(f"| {r['layout']} | {n} | {curl} | {r['raw']:.2f} s ({n / r['raw']:.0f}/s) | {r['relay']:.2f} s "
              f"({n / r['relay']:.0f}/s), first file in sent/ after {r['first']:.2f} s "
              f"| **{r['raw'] / r['relay']:.2f}x** ({low:.2f}-{high:.2f}) | {ratio_curl} | {r['cpu']:.2f} ms "
              f"| {r['raw_cpu']:.2f} ms | {r.get('pacs_raw', 0):.2f} / {r.get('pacs_relay', 0):.2f} ms |"
              + (f" {r['raw'] / r['other']:.2f}x | {r['other_cpu']:.2f} ms |" if other else "")
              + (f" {r['raw'] / r['routed']:.2f}x | {r['routed_cpu']:.2f} ms |" if args.routes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
