"""`user`: the dashboard's accounts in web.users_file (argon2 hashes; the file is 0600)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from relaypacsd.commands.common import EXIT_OK, UsageError, load, table
from relaypacsd.web.users import ROLES, User, check_name, hash_password, read_users, write_users

MIN_PASSWORD = 10


def _users_file(args: argparse.Namespace) -> Path:
    if getattr(args, "file", None):
        return Path(args.file)
    config = load(args)
    if not config.web.users_file:
        raise UsageError("web.users_file is not set: add users_file = \"/etc/relaypacs/web-users.json\" to [web] in "
                         f"{config.source} (or pass --file PATH)")
    return Path(config.web.users_file)


def _password(args: argparse.Namespace, name: str) -> str:
    """From stdin with --password-stdin (scripts), else asked twice on the terminal; never an argument."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the two passwords differ: nothing was written")
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"the password must have at least {MIN_PASSWORD} characters")
    return password


def _existing(path: Path) -> dict[str, User]:
    return read_users(path) if path.exists() else {}


def cmd_user_add(args: argparse.Namespace) -> int:
    """Add a user (or set a user's password and role): the dashboard reads the file again at once."""
    name = check_name(args.name)
    path = _users_file(args)
    users = _existing(path)
    if name in users and not args.update:
        raise UsageError(f"user {name!r} exists in {path}: pass --update to set a new password and role")
    users[name] = User(name, args.role, hash_password(_password(args, name)))
    write_users(path, users)
    print(f"{'updated' if args.update else 'added'} {name} ({args.role}) in {path}")
    return EXIT_OK


def cmd_user_remove(args: argparse.Namespace) -> int:
    """Remove a user; its sessions end at its next request."""
    path = _users_file(args)
    users = _existing(path)
    if args.name not in users:
        raise UsageError(f"no user {args.name!r} in {path}")
    del users[args.name]
    write_users(path, users)
    print(f"removed {args.name} from {path}")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    """The users and their roles (never their hashes)."""
    path = _users_file(args)
    users = _existing(path)
    if not users:
        print(f"no users in {path}")
        return EXIT_OK
    print(table(["user", "role"], [[u.name, u.role] for u in sorted(users.values(), key=lambda u: u.name)]))
    return EXIT_OK


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """`user add|remove|list` on the command line."""
    from relaypacsd.cli import _lazy

    p = sub.add_parser("user", help="accounts of the dashboard (web.users_file)")
    usub = p.add_subparsers(dest="user_command", metavar="SUBCOMMAND")
    add = usub.add_parser("add", help="add a user (the password is asked for, or read from stdin)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", choices=ROLES, required=True, help="viewer: reads; operator: also retries and pauses")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    add.add_argument("--update", action="store_true", help="set a new password and role for an existing user")
    add.set_defaults(func=_lazy("user", "cmd_user_add"))
    rm = usub.add_parser("remove", help="remove a user")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=_lazy("user", "cmd_user_remove"))
    ls = usub.add_parser("list", help="the users and their roles")
    ls.set_defaults(func=_lazy("user", "cmd_user_list"))
    for command in (add, rm, ls):
        command.add_argument("--file", metavar="PATH", help="the users file (default: web.users_file of the config)")
        command.add_argument("-c", "--config", default=argparse.SUPPRESS, help="path of relaypacs.toml")
    return p


