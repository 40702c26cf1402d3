"""`send PATH...`: a one-shot upload for humans, through the daemon's sender and outcome code; files stay put."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from relaypacsd import dicomfile, routing
from relaypacsd.commands.common import (EXIT_FAIL, EXIT_OK, Progress, UsageError, expand_paths_from, load, place,
                                        print_json, table, targets)
from relaypacsd.config import Config
from relaypacsd.delivery import deliver_parts
from relaypacsd.dicomfile import DicomInfo
from relaypacsd.errors import InvalidDicomError
from relaypacsd.models import Part
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.grouping import fill_batch
from relaypacsd.senders import build_sender


def batches(items: list[tuple[Path, DicomInfo]], max_n: int, max_bytes: int) -> list[list[tuple[Path, DicomInfo]]]:
    """Group as the daemon does (its study first, then others), within the instance and byte caps."""
    rest, out = list(items), []
    while rest:
        batch = fill_batch(rest[0], rest[1:], _info, max_n, max_bytes)
        taken = {id(i) for i in batch}
        rest = [i for i in rest if id(i) not in taken]
        out.append(batch)
    return out


def _info(item: tuple[Path, DicomInfo]) -> DicomInfo:
    return item[1]


def cmd_send(args: argparse.Namespace) -> int:
    """Validate, batch and send files/folders to the active PACS, each by its route when [[route]] tables exist
    (or all to --to NAME); summary; non-zero if any failed or had no route."""
    config: Config = load(args)
    pacs_list = targets(config, args.to)
    found = expand_paths_from(args.paths)
    files = [f for f, _ in found]
    if not files:
        raise UsageError("no files found under the paths given")
    routed = bool(config.routes) and not args.to  # --to NAME sends there, whatever the routes say
    attributes = routing.keywords(config.routes) if routed else ()
    roots = [Path(w.path) for w in config.watch]
    valid: list[tuple[Path, DicomInfo]] = []
    invalid: list[tuple[Path, str]] = []
    unrouted: list[tuple[Path, str]] = []  # valid, but no route sends it to an active PACS
    dests: dict[Path, tuple[str, ...]] = {}  # with routes: each file's active destinations
    seen: set[str] = set()
    for path, base in found:
        try:
            info = dicomfile.inspect(path, strict_meta_uid=config.delivery.strict_meta_uid, attributes=attributes)
        except InvalidDicomError as exc:
            invalid.append((path, str(exc)))
            continue
        except OSError as exc:
            invalid.append((path, f"cannot read: {exc.strerror}"))
            continue
        if info.sop_instance_uid in seen:
            invalid.append((path, f"same SOPInstanceUID as another file given ({info.sop_instance_uid}): skipped"))
            continue
        if routed:
            decision = routing.decide(config.routes, info.attrs, *place(path, base, roots))
            dests[path] = tuple(d for d in decision.destinations if d in config.delivery.active_pacs)
            if not dests[path]:
                unrouted.append((path, routing.unmatched_reason(decision) if not decision.matched
                                 else routing.inactive_reason(decision)))
                continue
        seen.add(info.sop_instance_uid)
        valid.append((path, info))
    d = config.delivery
    report: dict[str, dict[Part, InstanceResult]] = {}
    started = time.monotonic()
    for pacs in pacs_list:
        sender = build_sender(pacs)
        mine = [(p, i) for p, i in valid if not routed or pacs.name in dests[p]]
        progress = Progress(f"send {pacs.name}", len(mine))
        done = 0
        results: dict[Part, InstanceResult] = {}

        def on_results(parts: list[Part], res: list[InstanceResult], progress: Progress = progress) -> None:
            nonlocal done
            done += len(parts)
            progress.update(done)

        for batch in batches(mine, d.batch_max_instances, d.batch_max_bytes):
            parts = [Part(p, i.sop_instance_uid, i.size) for p, i in batch]
            results.update(deliver_parts(sender, parts, d.retry_attempts, d.retry_delay, on_results=on_results))
        progress.done()
        report[pacs.name] = results
    elapsed = time.monotonic() - started
    failed = len(invalid) + len(unrouted) > 0
    summary = []
    problems = []
    for name, results in report.items():
        counts = Counter(r.outcome for r in results.values())
        not_ok = [(part, r) for part, r in results.items() if not r.outcome.delivered]
        failed = failed or bool(not_ok)
        summary.append({"pacs": name, "sent": counts[Outcome.DELIVERED], "duplicates": counts[Outcome.DUPLICATE],
                        "rejected": sum(1 for _, r in not_ok if r.outcome is Outcome.PERMANENT),
                        "failed": sum(1 for _, r in not_ok if r.outcome is not Outcome.PERMANENT),
                        "invalid": len(invalid)})
        problems += [{"pacs": name, "file": str(part.path), "outcome": r.outcome.value,
                      "code": None if r.reason_code is None else f"0x{r.reason_code:04X}", "reason": r.reason}
                     for part, r in not_ok]
    problems += [{"pacs": "-", "file": str(p), "outcome": "invalid", "code": None, "reason": why} for p, why in invalid]
    problems += [{"pacs": "-", "file": str(p), "outcome": "unrouted", "code": None, "reason": why}
                 for p, why in unrouted]
    if args.json:
        print_json({"files": len(files), "valid": len(valid), "seconds": round(elapsed, 2),
                    "summary": summary, "problems": problems})
    else:
        print(table(["PACS", "sent", "duplicates", "rejected", "failed", "invalid"],
                    [list(s.values()) for s in summary]))
        if problems:
            print()
            print(table(["PACS", "file", "outcome", "reason"],
                        [[p["pacs"], p["file"], p["outcome"] + (f" {p['code']}" if p["code"] else ""), p["reason"]]
                         for p in problems]))
        by = " by their routes" if routed else ""
        print(f"{len(valid)} valid file(s) of {len(files)} to {len(pacs_list)} PACS{by} in {elapsed:.1f} s"
              + (": NOT everything was delivered" if failed else ": all delivered"))
    if failed and args.json:
        print("relaypacsd: not everything was delivered (see problems)", file=sys.stderr)
    return EXIT_FAIL if failed else EXIT_OK
