"""`retry`: move failed files back to sending/ (relaypacsd.requeue does the work; this reports it)."""

from __future__ import annotations

import argparse
import getpass
import os
from pathlib import Path

from relaypacsd.commands.common import EXIT_FAIL, EXIT_OK, UsageError, load, short
from relaypacsd.errors import RequeueError
from relaypacsd.journal import journal_for
from relaypacsd.requeue import requeue
from relaypacsd.sidecars import read_sidecar
from relaypacsd.spool import Spool


def _spool_of(path: Path, spools: list[Spool]) -> tuple[Spool, Path]:
    """The watch root whose failed/ holds `path`, and the path spelled as the daemon spells it (journal key)."""
    for spool in spools:
        try:
            rel = path.relative_to(spool.failed.absolute())
        except ValueError:
            continue
        return spool, spool.failed / rel
    roots = ", ".join(str(s.failed) for s in spools) or "none configured"
    raise UsageError(f"{path}: not inside a failed/ folder of a watch root ({roots}): only failed files can be retried")


def _todo(args: argparse.Namespace, spools: list[Spool]) -> list[tuple[Spool, Path]]:
    """The failed files the command line names (or all of them with --all), each with its watch root."""
    if not args.all and not args.files:
        raise UsageError("name the failed files to retry, or pass --all")
    todo: list[tuple[Spool, Path]] = []
    if args.all:
        for spool in spools:
            if spool.failed.is_dir():
                todo += [(spool, p) for p in spool.files("failed")]
    for raw in args.files or []:
        path = Path(raw).absolute()
        if path.name.endswith(".error.json"):
            path = path.with_name(path.name[: -len(".error.json")])
        if not path.is_file():
            raise UsageError(f"{raw}: no such file")
        todo.append(_spool_of(path, spools))
    return todo


def operator_name() -> str:
    """Who runs the command, for the delivery history: the user behind sudo, else the login name."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container's): the uid says who
        return f"uid {os.getuid()}"


def cmd_retry(args: argparse.Namespace) -> int:
    """Move failed files back to sending/ and reset their 'failed' journal rows to 'pending'."""
    config = load(args)
    todo = _todo(args, [Spool(Path(w.path)) for w in config.watch])
    if not todo:
        print("nothing to retry: no file in failed/")
        return EXIT_OK
    state_dir = Path(config.daemon.state_dir)
    journal = journal_for(config) if state_dir.is_dir() or config.journal.url else None
    errors = 0
    try:
        for spool, path in todo:
            reason = (read_sidecar(path) or {}).get("reason", "")
            try:
                done = requeue(spool, journal, path, user=operator_name())
            except RequeueError as exc:
                errors += 1
                print(f"FAIL {exc}")
                continue
            for warning in done.warnings:
                print(f"warn {warning}")
            again = f" for {', '.join(done.reset_dests)}" if done.reset_dests else ""
            print(f"queued {spool.relative(done.new_path)} in {spool.sending}{again} "
                  f"(was: {short(reason, 80) or 'no reason recorded'})")
    finally:
        if journal is not None:
            journal.close()
    print(f"{len(todo) - errors} file(s) back in sending/: the running daemon sends them at its next retry sweep")
    return EXIT_FAIL if errors else EXIT_OK
