#!/usr/bin/env python3
"""Throughput of relaypacsd against a real Orthanc, side by side with plain baselines in the same run.

    .venv/bin/python bench/benchmark.py                 # 500 and 2,000 instances
    .venv/bin/python bench/benchmark.py --counts 200    # a quick look

Everything runs on 127.0.0.1: a private Orthanc (DICOMweb plugin) started here, stopped at the end.
Each sender gets its own freshly generated instances (new UIDs), so nobody is timed on duplicates.
  curl loop     one `curl` process per file, STOW-RS of one instance (a shell script's way)
  raw batched   requests, STOW-RS batches of 50, 4 threads, bodies streamed from disk (the ceiling)
  relaypacsd    the daemon as shipped (a subprocess, default settings but settle time): files are
                written into inbox/ one by one, as a modality does; timed until all are in sent/
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

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


def run_raw(orthanc: LocalOrthanc, paths: list[Path], batch: int = 50, threads: int = 4) -> float:
    """Batched STOW-RS with requests: 4 threads, one session each, bodies streamed with Content-Length."""
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

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, batches))
    return time.perf_counter() - started


def run_relaypacsd(orthanc: LocalOrthanc, paths: list[Path], work: Path) -> tuple[float, float]:
    """Start the daemon, write the files into inbox/, time until all are in sent/. Returns (total, first)."""
    user, password = orthanc.auth
    (work / "pw").write_text(password)
    cfg = work / "relaypacs.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{work / "state"}"\nlog_level = "WARNING"\n'
                   f'[[watch]]\npath = "{work / "spool"}"\n'
                   f'[pacs.orthanc]\ntype = "orthanc"\nurl = "{orthanc.url}"\nusername = "{user}"\n'
                   f'password_file = "{work / "pw"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "run"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    try:
        inbox, sent = work / "spool" / "inbox", work / "spool" / "sent"
        deadline = time.monotonic() + 30
        while not (work / "state" / "heartbeat.json").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("daemon did not start: " + (work / "daemon.log").read_text()[-2000:])
            time.sleep(0.05)
        started = time.perf_counter()
        first: list[float] = []

        def watch_first() -> None:  # the latency of the first file, measured while the others are written
            while not first and time.perf_counter() - started < 600:
                if sent.exists() and any(True for _ in os.scandir(sent)):
                    first.append(time.perf_counter() - started)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch_first, daemon=True)
        watcher.start()
        for p in paths:  # written in place and closed, as a modality does
            shutil.copyfile(p, inbox / p.name)
        target = len(paths)
        while True:
            n = sum(1 for _ in os.scandir(sent)) if sent.exists() else 0
            if n >= target:
                total = time.perf_counter() - started
                watcher.join(1)
                return total, first[0] if first else total
            if proc.poll() is not None:
                raise RuntimeError("daemon died: " + (work / "daemon.log").read_text()[-2000:])
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--skip-curl-above", type=int, default=100000, help="skip the slow curl loop above N")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="relaypacs-bench-") as tmp:
        tmp_path = Path(tmp)
        with LocalOrthanc(tmp_path / "orthanc") as orthanc:
            for count in args.counts:
                work = tmp_path / f"n{count}"
                sets = {name: generate(work / name / "files", count) for name in ("curl", "raw", "relay")}
                result = {"n": count}
                if count <= args.skip_curl_above:
                    result["curl"] = run_curl(orthanc, sets["curl"], work / "curl")
                result["raw"] = run_raw(orthanc, sets["raw"])
                result["relay"], result["first"] = run_relaypacsd(orthanc, sets["relay"], work / "relay")
                expected = count * 3 if "curl" in result else count * 2
                stored = sum(orthanc.count_instances() for _ in [0])
                rows.append(result)
                print(f"n={count}: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.items() if k != "n")
                      + f" (Orthanc holds {stored} instances)", flush=True)
                del expected
    print()
    print("| instances | one curl per file | raw batched STOW, 4 threads | relaypacsd inbox -> sent | relaypacsd / raw | relaypacsd / curl |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = r["n"]
        curl = f"{r['curl']:.1f} s ({n / r['curl']:.0f}/s)" if "curl" in r else "-"
        ratio_curl = f"{r['curl'] / r['relay']:.1f}x" if "curl" in r else "-"
        print(f"| {n} | {curl} | {r['raw']:.1f} s ({n / r['raw']:.0f}/s) | {r['relay']:.1f} s ({n / r['relay']:.0f}/s), "
              f"first file in sent/ after {r['first']:.2f} s | {r['raw'] / r['relay']:.2f}x | {ratio_curl} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
