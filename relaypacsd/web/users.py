"""The dashboard's accounts: a JSON file of names, roles and argon2 hashes (`relaypacsd user add` writes it)."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from relaypacsd.errors import ConfigError

ROLES = ("viewer", "operator")  # viewers read everything; operators also retry and pause
_HASHER = PasswordHasher()  # argon2id with the library's defaults (RFC 9106's second recommendation)
# Verified when the name is unknown, so an unknown name costs as long as a wrong password (no name probing).
_DUMMY = _HASHER.hash("relaypacsd: no such user")


@dataclass(frozen=True)
class User:
    """One account. `hash` never leaves this module's callers: no page, log or API answer shows it."""

    name: str
    role: str
    hash: str

    def __repr__(self) -> str:
        return f"User({self.name!r}, {self.role!r})"

    @property
    def operator(self) -> bool:
        return self.role == "operator"


def check_name(name: str) -> str:
    """A user name: 1-64 letters, digits, '.', '_', '-', '@'."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name):
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
    return name


def read_users(path: str | Path) -> dict[str, User]:
    """Every account in the file; ConfigError (one line) when it cannot be read or is not ours."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"web.users_file = {str(path)!r}: no such file: create it with "
                          "`relaypacsd user add NAME --role operator`") from None
    except PermissionError:
        raise ConfigError(f"web.users_file = {str(path)!r}: not readable by this user: chown it to the service "
                          "user (mode 600)") from None
    except (OSError, ValueError):
        raise ConfigError(f"web.users_file = {str(path)!r}: not a users file written by `relaypacsd user add`: "
                          "move it away and add the users again") from None
    users = doc.get("users") if isinstance(doc, dict) else None
    if not isinstance(users, dict):
        raise ConfigError(f"web.users_file = {str(path)!r}: no \"users\" table: write it with `relaypacsd user add`")
    out = {}
    for name, entry in users.items():
        if not isinstance(entry, dict) or entry.get("role") not in ROLES or not str(entry.get("hash", "")).startswith("$argon2"):
            raise ConfigError(f"web.users_file = {str(path)!r}: user {name!r} has no valid role or hash: "
                              f"add it again with `relaypacsd user add {name} --role viewer|operator`")
        out[name] = User(name, entry["role"], entry["hash"])
    return out


def write_users(path: str | Path, users: dict[str, User]) -> None:
    """Write the file atomically, readable by its owner only."""
    path = Path(path)
    doc = {"users": {u.name: {"role": u.role, "hash": u.hash} for u in sorted(users.values(), key=lambda u: u.name)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(hashed: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


class Users:
    """The accounts of a running dashboard, read again when the file changes (`user add` needs no restart)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users = read_users(self.path)  # at start: a bad file stops the start with one line
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> dict[str, User]:
        """The accounts now; a file that became unreadable keeps the last good ones."""
        stamp = self._file_stamp()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._users = read_users(self.path)
                except ConfigError:
                    pass
            return self._users

    def get(self, name: str) -> User | None:
        return self.current().get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when the password is right; as slow for an unknown name as for a wrong password."""
        user = self.get(name)
        ok = verify_password(user.hash if user else _DUMMY, password)
        return user if ok and user is not None else None
