"""The `relaypacsd` command line: one function per command, each callable in-process with args."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from relaypacsd import __version__
from relaypacsd.config import Config, find_config_path, load_config, to_toml
from relaypacsd.errors import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, ConfigError, RelayPacsError
from relaypacsd.heartbeat import heartbeat_path, process_gone, read_heartbeat


def _load(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from relaypacsd.daemon import Daemon
    from relaypacsd.logs import setup_logging

    config = _load(args)
    if not config.watch:
        raise ConfigError(f"{config.source}: no [[watch]] table: add one with path = \"/srv/relaypacs/inbox-root\"")
    setup_logging(config.daemon, level=args.log_level)
    from loguru import logger

    logger.info("relaypacsd {} starting with {}", __version__, config.source)
    for line in to_toml(config).splitlines():
        logger.debug("config: {}", line)
    return Daemon(config).run()


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective configuration (file + environment) as TOML, secrets masked."""
    config = _load(args)
    print(f"# effective configuration from {config.source} and the environment; secrets masked")
    print(to_toml(config), end="")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    """Write a starter relaypacs.toml, taking values from the operators' environment variables."""
    from relaypacsd.config import build_config

    target = Path(args.config or os.environ.get("RELAYPACS_CONFIG") or "relaypacs.toml")
    if target.exists() and not args.force:
        raise RelayPacsError(f"{target} exists: pass --force to overwrite it, or choose another --config path")
    # Absolute: the service reads this file from another working directory.
    root = os.path.abspath(args.watch or "/srv/relaypacs/default")
    raw = {"daemon": {"state_dir": os.path.abspath(args.state_dir)}, "watch": [{"path": root}]}
    config = build_config(raw, os.environ, str(target))
    # Secrets that came from the environment stay out of the file: the environment keeps providing them.
    text = to_toml(config, mask=True).replace('"********"', '""')
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("# relaypacsd configuration, written by `relaypacsd init`.\n"
                      "# Every key is documented in relaypacs.toml.example; environment variables override it.\n" + text)
    os.chmod(target, 0o640)
    print(f"wrote {target}: watch root {root}; PACS: {', '.join(config.pacs) or 'none yet (set ORTHANC_URL)'}")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 only if the running daemon's heartbeat is fresh and its threads are alive."""
    config = _load(args)
    beat = read_heartbeat(config.daemon.state_dir)
    if beat is None:
        print(f"unhealthy: no heartbeat at {heartbeat_path(config.daemon.state_dir)}: is relaypacsd running with state_dir {config.daemon.state_dir}?")
        return EXIT_FAIL
    if beat.get("stopped"):
        print(f"unhealthy: relaypacsd (pid {beat.get('pid')}) stopped at {time.ctime(float(beat.get('time', 0)))}")
        return EXIT_FAIL
    if process_gone(beat):
        print(f"unhealthy: relaypacsd (pid {beat.get('pid')}) is not running (crashed or killed): "
              "start the service, then see its log")
        return EXIT_FAIL
    age = time.time() - float(beat.get("time", 0))
    limit = max(15.0, 3 * config.daemon.heartbeat_interval)
    if age > limit:
        print(f"unhealthy: last heartbeat {age:.0f} s ago (limit {limit:.0f} s): the daemon is stuck or stopped")
        return EXIT_FAIL
    if not beat.get("alive", False):
        print("unhealthy: a watcher, worker or scheduler thread has died: see the log, restart the service")
        return EXIT_FAIL
    print(f"healthy: heartbeat {age:.0f} s ago, {beat.get('in_flight', 0)} file(s) in flight")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run a working local setup: a private Orthanc on 127.0.0.1 (unless ORTHANC_URL is set) and a demo spool."""
    from relaypacsd.demo import run_demo

    return run_demo(Path(args.dir))


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="relaypacsd",
        description="Forward DICOM files dropped into inbox folders to PACS over DICOMweb STOW-RS (C-STORE fallback).")
    parser.add_argument("--version", action="version", version=f"relaypacsd {__version__}")
    parser.add_argument("-c", "--config", help="path of relaypacs.toml (default: $RELAYPACS_CONFIG, then "
                                               "/etc/relaypacs/relaypacs.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground (systemd and Docker run this)")
    p.add_argument("--log-level", type=str.upper, choices=["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"],
                   help="override daemon.log_level")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate the config and test every PACS (DNS, TCP, TLS, credentials, "
                                     "DICOMweb, C-ECHO)")
    p.set_defaults(func=_lazy("check", "cmd_check"))

    p = sub.add_parser("init", help="write a starter relaypacs.toml from the environment (ORTHANC_URL, ...)")
    p.add_argument("--watch", help="the first watch root (default /srv/relaypacs/default)")
    p.add_argument("--state-dir", default="/var/lib/relaypacs", help="where the journal lives")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = csub.add_parser("show", help="print the effective configuration, secrets masked")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("demo", help="start a private Orthanc on 127.0.0.1 and run the daemon on ./demo/spool")
    p.add_argument("--dir", default="demo", help="working folder of the demo (default ./demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("health", help="exit 0 if the running daemon is alive (Docker HEALTHCHECK, monitoring)")
    p.set_defaults(func=cmd_health)
    _add_operator_commands(sub)
    from relaypacsd.commands.user import add_parser as add_user_parser  # its own -c on each subcommand

    users = add_user_parser(sub)
    # `relaypacsd init --config X` as well as `relaypacsd -c X init`: after a command, -c sets the same value.
    for command in [c for c in sub.choices.values() if c is not users] + [show]:
        command.add_argument("-c", "--config", default=argparse.SUPPRESS, help="path of relaypacs.toml")
    return parser


def _lazy(module: str, name: str) -> Command:
    """A command implemented in relaypacsd.commands.<module>, imported only when it runs."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"relaypacsd.commands.{module}"), name)(args)
    run.__name__ = name
    return run


def _add_operator_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """status, retry, send, query, retrieve, route, verify, history (docs/commands.md)."""
    p = sub.add_parser("status", help="counts per folder, oldest waiting file, each PACS's health (safe while running)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("status", "cmd_status"))

    p = sub.add_parser("retry", help="move failed files back to sending/ so the daemon sends them again")
    p.add_argument("files", nargs="*", metavar="FILE", help="files in a failed/ folder")
    p.add_argument("--all", action="store_true", help="every file in every failed/ folder")
    p.set_defaults(func=_lazy("retry", "cmd_retry"))

    p = sub.add_parser("pause", help="hold one PACS: no new deliveries, its files wait in sending/ (kept across restarts)")
    p.add_argument("name", metavar="NAME", help="an active PACS")
    p.set_defaults(func=_lazy("pause", "cmd_pause"))
    p = sub.add_parser("resume", help="release a paused PACS")
    p.add_argument("name", metavar="NAME", help="an active PACS")
    p.set_defaults(func=_lazy("pause", "cmd_resume"))

    p = sub.add_parser("send", help="one-shot upload of files or folders (recursive); files are not moved")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--to", metavar="NAME", help="only this PACS (default: every active PACS)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=_lazy("send", "cmd_send"))

    p = sub.add_parser("query", help="QIDO-RS study search (patient names only with --show-names)")
    p.add_argument("--patient-id")
    p.add_argument("--study-date", metavar="DATE", help="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    p.add_argument("--modality", help="CT, MR, US, ...")
    p.add_argument("--accession")
    p.add_argument("--study-uid")
    p.add_argument("--to", metavar="NAME", help="the PACS to ask (default: the first active one)")
    p.add_argument("--limit", type=int, default=100, help="at most this many studies (default 100)")
    p.add_argument("--show-names", action="store_true", help="add the PatientName column")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("query", "cmd_query"))

    p = sub.add_parser("retrieve", help="WADO-RS download of a study, one file per instance")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the files (created)")
    p.add_argument("--from", dest="source", metavar="NAME", help="the PACS (default: the first active one)")
    p.set_defaults(func=_lazy("query", "cmd_retrieve"))

    p = sub.add_parser("route", help="which route each file takes, its PACS, and why the routes before it did not "
                                     "match (files are not moved)")
    p.add_argument("paths", nargs="+", metavar="FILE|DIR")
    p.add_argument("--watch", metavar="ROOT", help="route files outside a watch root as if dropped into ROOT's inbox/ "
                                                   "(their path below the folder named)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("route", "cmd_route"))

    _add_history_command(sub)

    p = sub.add_parser("verify", help="is every instance (of a study, or of these files) at every PACS it is routed to?")
    p.add_argument("targets", nargs="+", metavar="STUDY_UID|PATH")
    p.add_argument("--from", dest="source", metavar="NAME", help="the PACS listing the study (default: first active)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("query", "cmd_verify"))


def _add_history_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """history (commands/history.py): every filter given must match; newest first."""
    from relaypacsd.history import DEFAULT_LIMIT, OUTCOMES

    p = sub.add_parser("history", help="where did a study go: the delivery history, newest first (safe while running)",
                       description="The delivery history: one record per instance, per PACS, per outcome, newest "
                                   "first. Every filter given must match. T is ISO 8601 (UTC unless it has an offset) "
                                   "or a time ago: 30m, 2h, 3d, 1w.")
    p.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    p.add_argument("--patient", metavar="ID", help="PatientID")
    p.add_argument("--accession", metavar="N", help="AccessionNumber")
    p.add_argument("--sop", metavar="UID", help="SOPInstanceUID")
    p.add_argument("--file", metavar="NAME", help="the name below sending/ as claimed (CT1/IM0001), or a path in a "
                                                  "watch root")
    p.add_argument("--pacs", metavar="NAME", help="the destination")
    p.add_argument("--outcome", choices=OUTCOMES, metavar="O", help=f"one of {', '.join(OUTCOMES)}")
    p.add_argument("--since", metavar="T", help="records at or after T")
    p.add_argument("--until", metavar="T", help="records at or before T")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"the newest N records (default {DEFAULT_LIMIT}; 0: every match)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table (default), csv (RFC 4180 with a header row, for a spreadsheet) or json")
    p.set_defaults(func=_lazy("history", "cmd_history"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run one command, turn our errors into one line and an exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        return func(args)
    except RelayPacsError as exc:
        print(f"relaypacsd: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAIL
    except OSError as exc:  # a path the operator gave (init's target, an output folder): say which and why
        where = f": {exc.filename}" if exc.filename else ""
        print(f"relaypacsd: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
