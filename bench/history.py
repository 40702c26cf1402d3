#!/usr/bin/env python3
"""How fast `relaypacsd history` answers with a million records in the delivery history.

    .venv/bin/python bench/history.py                    # 1,000,000 records (a couple of minutes to fill)
    .venv/bin/python bench/history.py --records 100000   # a quick look

Fills a fresh journal (in a temporary state directory on the real disk) with synthetic records shaped like a
year of a busy site: studies of `--per-study` instances, each delivered to two PACS, a few waiting first, spread
over 365 days. Then times, on a cold and on a warm cache:
  find_history   the journal's query alone, in this process (the read-only journal, as the command opens it)
  command        `relaypacsd history --study UID` end to end, a new Python process each time (what an
                 operator waits for), for a study among the oldest, one in the middle and the newest
and the cost of recording while it is that full: records written 50 per commit, as one batch's answer is.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relaypacsd.history import HistoryQuery, HistoryRecord  # noqa: E402
from relaypacsd.journal import JOURNAL_FILE, open_journal  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"


def uid() -> str:
    """A UID of the 2.25 form (a UUID as an integer), as random as generated ones are."""
    return f"2.25.{uuid.uuid4().int}"


def study_records(t: float, n: int, k: int, pacs: tuple[str, ...]) -> list[HistoryRecord]:
    """The records of one study of `n` instances delivered at about `t` to each PACS (every 20th waited first)."""
    study, series, patient, accession = uid(), uid(), f"PID{k:07d}", f"ACC{k:08d}"
    out = []
    for i in range(n):
        sop = uid()
        for dest in pacs:
            common = dict(watch="/srv/relaypacs/ct", file=f"CT{k % 7}/{k:07d}/IM{i:05d}.dcm", sop_instance_uid=sop,
                          sop_class_uid=CT, series_instance_uid=series, study_instance_uid=study,
                          patient_id=patient, accession_number=accession, modality="CT", destination=dest,
                          bytes=525_000, duration_ms=180.0)
            if i % 20 == 0:
                out.append(HistoryRecord(t, outcome="waiting", status_code=503, attempt=1,
                                         reason="transient (HTTP 503): PACS busy", **common))
            out.append(HistoryRecord(t + 1, outcome="delivered", status_code=200, attempt=2 if i % 20 == 0 else 1,
                                     reason="delivered (HTTP 200): stored: listed in ReferencedSOPSequence",
                                     **common))
    return out


def fill(state: Path, total: int, per_study: int) -> list[str]:
    """Write about `total` records, oldest first; return the study UIDs in the order written."""
    journal = open_journal(state)
    pacs = ("orthanc", "breast")
    per = len(study_records(0, per_study, 0, pacs))
    studies = max(1, total // per)
    start = time.time() - 365 * 86400
    uids: list[str] = []
    started = time.monotonic()
    batch: list[HistoryRecord] = []
    try:
        for k in range(studies):
            records = study_records(start + k * 365 * 86400 / studies, per_study, k, pacs)
            uids.append(records[0].study_instance_uid)
            batch += records
            if len(batch) >= 5000:  # big commits: filling is not what is measured
                journal.record_history(batch)
                batch = []
            if k and k % max(1, studies // 10) == 0:
                print(f"  {k * per:>9,} records, {time.monotonic() - started:.0f} s", flush=True)
        journal.record_history(batch)
    finally:
        journal.close()
    return uids


def drop_cache(path: Path) -> bool:
    """Ask the kernel to forget the journal's pages (a cold start); False when it may not."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def time_query(state: Path, study: str, rounds: int) -> list[float]:
    """ms of find_history(--study) on a read-only journal opened afresh each round."""
    out = []
    for _ in range(rounds):
        journal = open_journal(state, readonly=True)
        try:
            started = time.perf_counter()
            found = journal.find_history(HistoryQuery(study=study))
            out.append((time.perf_counter() - started) * 1000)
        finally:
            journal.close()
        assert found and all(r.study_instance_uid == study for r in found)
    return out


def time_command(config: Path, study: str, rounds: int) -> list[float]:
    """ms of `python -m relaypacsd history --study UID` end to end, a new process each round."""
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(config), "history", "--study", study],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        out.append((time.perf_counter() - started) * 1000)
        assert res.returncode == 0 and study not in res.stderr, res.stderr
    return out


def time_recording(state: Path, n: int = 5000) -> float:
    """us per record written 50 per commit into the full history (the daemon's shape: one batch, one commit)."""
    records = study_records(time.time(), n // 2, 10**7, ("orthanc",))
    journal = open_journal(state)
    try:
        started = time.perf_counter()
        for i in range(0, len(records), 50):
            journal.record_history(records[i:i + 50])
        return (time.perf_counter() - started) * 1e6 / len(records)
    finally:
        journal.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--per-study", type=int, default=200, help="instances per study (default 200)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relaypacs-bench-history-") as tmp:
        state = Path(tmp) / "state"
        config = Path(tmp) / "relaypacs.toml"
        config.write_text(f'[daemon]\nstate_dir = "{state}"\n[[watch]]\npath = "{Path(tmp) / "spool"}"\n')
        print(f"filling {args.records:,} records ({args.per_study} instances per study, 2 PACS) ...", flush=True)
        started = time.monotonic()
        studies = fill(state, args.records, args.per_study)
        filled = time.monotonic() - started
        with sqlite3.connect(f"file:{state / JOURNAL_FILE}?mode=ro", uri=True) as db:
            total = db.execute("SELECT count(*) FROM delivery_history").fetchone()[0]
        size = sum(f.stat().st_size for f in state.iterdir()) / 2**20
        print(f"filled {total:,} records in {filled:.0f} s; the journal is {size:.0f} MiB "
              f"({size * 2**20 / total:.0f} bytes per record, indexes included)")
        picks = {"oldest": studies[0], "middle": studies[len(studies) // 2], "newest": studies[-1],
                 "random": random.choice(studies)}
        cold = drop_cache(state / JOURNAL_FILE)
        first = time_query(state, picks["random"], 1)[0]
        print(f"find_history --study, {'cold cache' if cold else 'first look'}: {first:.1f} ms")
        for name, study in picks.items():
            q = time_query(state, study, args.rounds)
            c = time_command(config, study, args.rounds)
            print(f"{name:>7} study: find_history median {statistics.median(q):.1f} ms (max {max(q):.1f}); "
                  f"`relaypacsd history --study` median {statistics.median(c):.0f} ms (max {max(c):.0f})", flush=True)
        print(f"recording into the full history, 50 per commit: {time_recording(state):.0f} us per record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
