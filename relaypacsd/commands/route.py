"""`route FILE|DIR...`: which route each file takes and why the routes before it did not match (a rule tester)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from relaypacsd import dicomfile, routing
from relaypacsd.commands.common import EXIT_FAIL, EXIT_OK, expand_paths_from, load, place, print_json
from relaypacsd.config import Config
from relaypacsd.errors import InvalidDicomError


def decide_file(config: Config, path: Path, base: Path, watch: str | None = None) -> dict[str, Any]:
    """One file's routing as the daemon would decide it now: its routes, active destinations and skipped
    (inactive) ones, every route tried; `error` when it is no valid instance."""
    roots = [Path(w.path) for w in config.watch]
    where, rel = place(path, base, roots, watch)
    out: dict[str, Any] = {"file": str(path), "watch": where, "path": rel}
    try:
        info = dicomfile.inspect(path, attributes=routing.keywords(config.routes))
    except (InvalidDicomError, OSError) as exc:
        return {**out, "error": str(exc)}
    active = set(config.delivery.active_pacs) if config.delivery.enabled else set()
    if not config.routes:
        return {**out, "routes": [], "destinations": sorted(active), "skipped": [], "tried": []}
    decision = routing.decide(config.routes, info.attrs, where, rel)
    return {**out, "routes": list(decision.routes),
            "destinations": [d for d in decision.destinations if d in active],
            "skipped": [d for d in decision.destinations if d not in active],
            "tried": [t.to_dict() for t in decision.tried]}


def cmd_route(args: argparse.Namespace) -> int:
    """For each file: the route that matched, its destinations, and for each route before it the condition
    that failed. Exit 1 when a file is invalid or would go to no active PACS."""
    config = load(args)
    results = [decide_file(config, path, base, args.watch) for path, base in expand_paths_from(args.paths)]
    if args.json:
        print_json(results)
    else:
        _print(config, results)
    stuck = [r for r in results if r.get("error") or not r["destinations"]]
    return EXIT_FAIL if stuck else EXIT_OK


def _print(config: Config, results: list[dict[str, Any]]) -> None:
    if not config.routes:
        active = ", ".join(config.delivery.active_pacs) or "none"
        print(f"no [[route]] configured: every file goes to every active PACS ({active})")
    width = max([len(r.name) for r in config.routes] + [0])
    routed = unrouted = invalid = 0
    for r in results:
        if r.get("error"):
            invalid += 1
            print(f"{r['path']}: not sent, invalid: {r['error']}")
            continue
        skipped = f" (not active, skipped: {', '.join(r['skipped'])})" if r["skipped"] else ""
        if r["destinations"]:
            routed += 1
            how = f"route {','.join(r['routes'])}" if r["routes"] else "every active PACS"
            print(f"{r['path']}: {how} -> {', '.join(r['destinations'])}{skipped}")
        else:
            unrouted += 1
            why = "NO ROUTE matches" if not r["routes"] else f"route {','.join(r['routes'])}: NO ACTIVE PACS{skipped}"
            print(f"{r['path']}: {why}: it would go to failed/ (stage routing)")
        for t in r["tried"]:
            to = next(x.to for x in config.routes if x.name == t["route"])
            verdict = f"yes -> {', '.join(to)}" if t["matched"] else f"no: {t['failed']}"
            print(f"    {t['route']:<{width}}  {verdict}")
    print(f"{len(results)} file(s): {routed} routed, {unrouted} to failed/ (no route, or no active PACS), "
          f"{invalid} invalid")
