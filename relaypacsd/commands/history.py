"""`history`: where did this study go? The delivery history, filtered, as a table, CSV or JSON.

Reads the journal read-only: safe while the daemon runs (SQLite's WAL lets it read while the daemon writes).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from relaypacsd.commands.common import EXIT_OK, RelayPacsError, UsageError, check_uid, load, short, table
from relaypacsd.config import Config
from relaypacsd.errors import JournalError
from relaypacsd.history import HistoryQuery, HistoryRecord, parse_time
from relaypacsd.journal import JOURNAL_FILE, journal_for, open_journal
from relaypacsd.spool import FOLDERS
from relaypacsd.timefmt import iso_time

FIELDS = [f.name for f in dataclasses.fields(HistoryRecord)]


def cmd_history(args: argparse.Namespace) -> int:
    """Print the newest history records matching the filters, newest first."""
    config = load(args)
    query = build_query(args, config, time.time())
    found = read(Path(config.daemon.state_dir), query, config)
    if args.format == "csv":
        write_csv(found, sys.stdout)
    elif args.format == "json":
        print(json.dumps([as_dict(r) for r in found], indent=2))
    elif found:
        print(as_table(found))
    else:
        print("no history record matches")
    return EXIT_OK


def build_query(args: argparse.Namespace, config: Config, now: float) -> HistoryQuery:
    """The command line's filters as a query; UsageError naming the flag that is wrong."""
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: use a number of records, or 0 for every match")
    return HistoryQuery(study=check_uid(args.study, "--study") if args.study else None,
                        patient=args.patient or None, accession=args.accession or None,
                        sop=check_uid(args.sop, "--sop") if args.sop else None,
                        file=claim_name(args.file, config) if args.file else None,
                        pacs=args.pacs or None, outcome=args.outcome or None,
                        since=_time(args.since, "--since", now), until=_time(args.until, "--until", now),
                        limit=args.limit)


def _time(text: str | None, flag: str, now: float) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text, now)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def claim_name(text: str, config: Config) -> str:
    """A file as the history names it: a path in a watch root's folder becomes its name there (as claimed);
    anything else is taken as that name already."""
    path = os.path.abspath(text)
    for watch in config.watch:
        for folder in FOLDERS:
            base = os.path.join(os.path.abspath(watch.path), folder)
            if path.startswith(base + os.sep):
                return path[len(base) + 1:]
    return text


def read(state_dir: Path, query: HistoryQuery, config: Config | None = None) -> list[HistoryRecord]:
    """The records, read-only; RelayPacsError with the fix when there is no journal to read. A config naming a
    shared PostgreSQL journal ([journal] url, #14) reads that one."""
    shared = config is not None and bool(config.journal.url)
    if not shared and not (state_dir / JOURNAL_FILE).exists():
        raise RelayPacsError(f"no journal in {state_dir} (daemon.state_dir): has relaypacsd run with this config?")
    try:
        journal = journal_for(config, readonly=True) if shared and config is not None else \
            open_journal(state_dir, readonly=True)
    except JournalError as exc:
        raise RelayPacsError(f"cannot read the journal: {exc} (run as the service's user, or root)") from None
    try:
        return journal.find_history(query)
    except JournalError as exc:
        raise RelayPacsError(f"cannot read the journal: {exc} (run as the service's user, or root)") from None
    finally:
        journal.close()


def as_dict(record: HistoryRecord) -> dict[str, Any]:
    """A record with its time in ISO 8601 UTC, for JSON and CSV."""
    out = dataclasses.asdict(record)
    out["time"] = iso_time(record.time)
    if record.duration_ms is not None:
        out["duration_ms"] = round(record.duration_ms, 1)
    return out


def write_csv(found: list[HistoryRecord], stream: Any) -> None:
    """RFC 4180: a header row, CRLF line ends, fields quoted where they hold a comma, quote or line break."""
    writer = csv.DictWriter(stream, fieldnames=FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for record in found:
        writer.writerow({k: "" if v is None else v for k, v in as_dict(record).items()})
    stream.flush()


def as_table(found: list[HistoryRecord]) -> str:
    """A table for a terminal: what happened where and when; the full UIDs are in --format csv and json."""
    headers = ["time (UTC)", "PACS", "outcome", "file", "modality", "patient", "accession", "try", "status", "ms",
               "reason"]
    extra = [("route", "route"), ("user", "user")]
    extra = [(h, f) for h, f in extra if any(getattr(r, f) for r in found)]  # only when some record has one
    rows = []
    for r in found:
        ms = "" if r.duration_ms is None else f"{r.duration_ms:.0f}"
        rows.append([iso_time(r.time).replace("+00:00", ""), r.destination or "-", r.outcome, r.file, r.modality,
                     r.patient_id, r.accession_number, r.attempt or "", r.status_code, ms]
                    + [getattr(r, f) for _, f in extra] + [short(r.reason, 70)])
    return table(headers[:-1] + [h for h, _ in extra] + headers[-1:], rows)

