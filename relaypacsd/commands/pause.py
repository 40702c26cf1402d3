"""`pause` / `resume`: hold one PACS (its files wait in sending/) and release it; kept across restarts.

The running daemon follows the state file within one heartbeat interval (relaypacsd.pauses)."""

from __future__ import annotations

import argparse
import getpass

from relaypacsd.commands.common import EXIT_OK, UsageError, load
from relaypacsd.config import Config
from relaypacsd.journal import journal_for
from relaypacsd.pauses import read_paused, set_paused


def _check(args: argparse.Namespace) -> tuple[Config, str]:
    config = load(args)
    active = [p.name for p in config.active()]
    if args.name not in active:
        raise UsageError(f"no active PACS named {args.name!r} (active: {', '.join(active) or 'none'})")
    return config, f"{getpass.getuser()} (command line)"


def _set(config: Config, name: str, paused: bool, who: str) -> None:
    """The hold in the state file, and in the delivery history with who did it (the shared journal's, if any)."""
    state_dir = config.daemon.state_dir
    journal = journal_for(config)
    try:
        set_paused(state_dir, name, paused, who, journal=journal)
    finally:
        journal.close()


def cmd_pause(args: argparse.Namespace) -> int:
    """Pause one PACS: no new deliveries to it; its files wait and do not expire."""
    config, who = _check(args)
    _set(config, args.name, True, who)
    print(f"paused {args.name}: the running daemon stops sending to it within a few seconds; "
          f"its files wait in sending/ (`relaypacsd resume {args.name}` resumes)")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume a paused PACS."""
    config, who = _check(args)
    held = read_paused(config.daemon.state_dir).get(args.name, {})
    _set(config, args.name, False, who)
    print(f"resumed {args.name} (paused by {held.get('by') or 'someone'} since {held.get('since') or '?'})")
    return EXIT_OK
