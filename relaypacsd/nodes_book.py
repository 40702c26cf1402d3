"""The journal's part for several gateways: nodes with their leases, and which node owns which file.

One class for both backends: the SQL is written once with `?` parameters and `{now}` for the journal's own
clock (the database server's, for PostgreSQL, so that nodes with skewed clocks agree on who is silent).
Ownership rows (`owners`) are of three kinds: `owned` (a file in sending/ this node works on), `reserved`
(a file in inbox/ this node is about to claim) and `seen` (a file in sending/ nobody owned at a look).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from relaypacsd.errors import LeaseLost
from relaypacsd.journal import NodeState

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    epoch INTEGER NOT NULL,         -- its incarnation: bumped by each start and by a takeover
    started {real} NOT NULL,
    heartbeat {real} NOT NULL,      -- by the journal's clock
    stopped INTEGER NOT NULL DEFAULT 0,
    taken_by TEXT NOT NULL DEFAULT '',
    health TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS owners (
    key TEXT PRIMARY KEY,           -- a file's journal key (watch root name/folder/path)
    node TEXT NOT NULL,             -- '' for a 'seen' row
    kind TEXT NOT NULL,             -- owned | reserved | seen
    since {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS owners_node ON owners(node);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
CHUNK = 500  # keys per statement (SQLite's parameter limit, and a modest PostgreSQL statement)
_COLUMNS = "name, host, pid, epoch, started, heartbeat, stopped, taken_by, health"

Statement = tuple[str, tuple[Any, ...]]


class Store(Protocol):
    """What NodeBook needs of a backend's connection."""

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self, statements: list[Statement], guard: Statement | None = None) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class Dialect:
    """How one backend writes a parameter, a floating-point column and its clock."""

    param: str  # "?" (SQLite) or "%s" (psycopg)
    real: str   # "REAL" or "DOUBLE PRECISION"
    now: str    # an SQL expression: seconds since the epoch by the database's clock
    # A takeover waits this briefly for a row another node's transaction holds (JournalBusy: the next sweep
    # tries again); SQLite has one writer and needs none.
    short_lock: tuple[Statement, ...] = ()

    def sql(self, text: str) -> str:
        """`text` written with ? and {now}, in this dialect."""
        return text.replace("{now}", self.now).replace("?", self.param)

    def schema(self) -> str:
        return SCHEMA.format(real=self.real)


SQLITE = Dialect("?", "REAL", "((julianday('now') - 2440587.5) * 86400.0)")
POSTGRES = Dialect("%s", "DOUBLE PRECISION", "(extract(epoch from clock_timestamp())::float8)",
                   (("SET LOCAL lock_timeout = '1s'", ()),))


class NodeBook:
    """Nodes, leases and file ownership in one backend's store; writes of a fenced node check its epoch."""

    def __init__(self, store: Store, dialect: Dialect, clock: Callable[[], float], shared: bool = True):
        self.store, self.d = store, dialect
        self.clock = clock
        self.me: tuple[str, int] | None = None  # (node, epoch) once fenced
        # Alone on its spool (SQLite) a node owns every file: `ensure` then writes no ownership row (no work per
        # file that is not needed), and a node's files are those with rows in sending/.
        self.shared = shared

    def _q(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self.store.query(self.d.sql(sql), args)

    def _tx(self, statements: list[Statement], guard: tuple[str, int] | None = None) -> list[tuple[Any, ...]]:
        check = None if guard is None else (self.d.sql("SELECT 1 FROM nodes WHERE name = ? AND epoch = ?"), guard)
        return self.store.transaction([(self.d.sql(s), a) for s, a in statements], check)

    # -- nodes ---------------------------------------------------------------------------------------

    def node(self, name: str) -> NodeState | None:
        found = [n for n in self._states("WHERE name = ?", (name,))]
        return found[0] if found else None

    def nodes(self) -> list[NodeState]:
        return self._states("ORDER BY name", ())

    def _states(self, where: str, args: tuple[Any, ...]) -> list[NodeState]:
        files = {n: c for n, c in self._q("SELECT node, COUNT(*) FROM owners WHERE kind = 'owned' GROUP BY node")}
        if not self.shared:  # the one node holding its lease holds every file with rows in sending/
            held = self._q("SELECT COUNT(DISTINCT path) FROM deliveries WHERE path LIKE '%/sending/%'")[0][0]
            live = self._q("SELECT name FROM nodes WHERE stopped = 0 AND taken_by = '' ORDER BY heartbeat DESC LIMIT 1")
            if live:  # other nodes keep what they own (in a test; a second node refuses a SQLite spool)
                files = {**files, live[0][0]: held + files.get(live[0][0], 0)}
        rows = self._q(f"SELECT {_COLUMNS}, {{now}} - heartbeat FROM nodes {where}", args)
        return [NodeState(name=r[0], host=r[1], pid=r[2], epoch=r[3], started=r[4], heartbeat=r[5], stopped=bool(r[6]),
                          taken_by=r[7], health=_health(r[8]), silent=max(0.0, r[9]), files=files.get(r[0], 0))
                for r in rows]

    def join(self, name: str, host: str, pid: int, expect_epoch: int) -> int | None:
        if expect_epoch == 0:
            sql = (f"INSERT INTO nodes ({_COLUMNS}) VALUES (?, ?, ?, 1, {{now}}, {{now}}, 0, '', '{{}}') "
                   "ON CONFLICT (name) DO NOTHING RETURNING epoch")
            found = self._tx([(sql, (name, host, pid))])
        else:
            found = self._tx([("UPDATE nodes SET host = ?, pid = ?, epoch = epoch + 1, started = {now}, heartbeat = {now}, "
                               "stopped = 0, taken_by = '' WHERE name = ? AND epoch = ? RETURNING epoch",
                               (host, pid, name, expect_epoch))])
        return int(found[0][0]) if found else None

    def beat(self, name: str, epoch: int, health: dict[str, Any]) -> bool:
        found = self._tx([("UPDATE nodes SET heartbeat = {now}, health = ? WHERE name = ? AND epoch = ? RETURNING 1",
                           (json.dumps(health, sort_keys=True), name, epoch))])
        return bool(found)

    def leave(self, name: str, epoch: int) -> None:
        self._tx([("UPDATE nodes SET stopped = 1, heartbeat = {now} WHERE name = ? AND epoch = ?", (name, epoch))])

    def take_over(self, name: str, epoch: int, lease: float) -> dict[str, int]:
        taken = {}
        # One transaction per silent node: the fence row is locked first, so two live nodes never both take one.
        for (other,) in self._q("SELECT name FROM nodes WHERE name != ? AND taken_by = '' AND "
                                "(stopped = 1 OR heartbeat < {now} - ?)", (name, lease)):
            found = self._tx([*self.d.short_lock,
                ("UPDATE nodes SET epoch = epoch + 1, taken_by = ? WHERE name = ? AND taken_by = '' AND "
                 "(stopped = 1 OR heartbeat < {now} - ?) RETURNING name", (name, other, lease)),
                ("DELETE FROM owners WHERE node = ? AND kind = 'reserved' AND EXISTS "
                 "(SELECT 1 FROM nodes WHERE name = ? AND taken_by = ?)", (other, other, name)),
                ("UPDATE owners SET node = ?, since = {now} WHERE node = ? AND kind = 'owned' AND EXISTS "
                 "(SELECT 1 FROM nodes WHERE name = ? AND taken_by = ?) RETURNING key", (name, other, other, name)),
            ], guard=(name, epoch))
            taken_rows = self._q("SELECT 1 FROM nodes WHERE name = ? AND taken_by = ?", (other, name))
            if taken_rows:
                taken[other] = len(found)
        return taken

    # -- ownership -----------------------------------------------------------------------------------

    def reserve(self, name: str, epoch: int, keys: list[str], lease: float) -> set[str]:
        got: set[str] = set()
        for chunk in _chunks(keys):
            values = ", ".join(["(?, ?, 'reserved', {now})"] * len(chunk))
            found = self._tx([(f"INSERT INTO owners (key, node, kind, since) VALUES {values} ON CONFLICT (key) DO UPDATE "
                               "SET node = excluded.node, since = excluded.since WHERE owners.kind = 'reserved' AND "
                               "(owners.node = excluded.node OR owners.since < {now} - ?) RETURNING key",
                               tuple(a for k in chunk for a in (k, name)) + (lease,))], guard=(name, epoch))
            got.update(r[0] for r in found)
        return got

    def claimed(self, name: str, reserved: list[str], owned: list[str]) -> None:
        stmts: list[Statement] = []
        for chunk in _chunks(reserved):
            stmts.append((f"DELETE FROM owners WHERE node = ? AND kind = 'reserved' AND key IN ({_marks(chunk)})",
                          (name, *chunk)))
        for chunk in _chunks(owned):
            # Ours whatever a row said: the claim's rename put this file there, and rename is atomic.
            values = ", ".join(["(?, ?, 'owned', {now})"] * len(chunk))
            stmts.append((f"INSERT INTO owners (key, node, kind, since) VALUES {values} ON CONFLICT (key) DO UPDATE "
                          "SET node = excluded.node, kind = 'owned', since = excluded.since",
                          tuple(a for k in chunk for a in (k, name))))
        if stmts:
            self._tx(stmts)

    def owners(self, keys: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(keys):
            out.update(self._q(f"SELECT key, node FROM owners WHERE kind = 'owned' AND key IN ({_marks(chunk)})", chunk))
        return out

    def adopt(self, name: str, epoch: int, keys: list[str], grace: float) -> list[str]:
        got: list[str] = []
        for chunk in _chunks(keys):
            values = ", ".join(["(?, '', 'seen', {now})"] * len(chunk))
            found = self._tx([
                (f"INSERT INTO owners (key, node, kind, since) VALUES {values} ON CONFLICT (key) DO NOTHING", tuple(chunk)),
                (f"UPDATE owners SET node = ?, kind = 'owned', since = {{now}} WHERE kind = 'seen' AND since <= {{now}} - ? "
                 f"AND key IN ({_marks(chunk)}) RETURNING key", (name, grace, *chunk))], guard=(name, epoch))
            got += [r[0] for r in found]
        return got

    # -- the statements other writes carry -----------------------------------------------------------

    def guard(self) -> Statement | None:
        """The check a fenced node's `apply` runs first in its transaction."""
        return None if self.me is None else (self.d.sql("SELECT 1 FROM nodes WHERE name = ? AND epoch = ?"), self.me)

    def own_statements(self, key: str) -> list[Statement]:
        """`ensure` by a fenced node: a file nobody owns (a zip's member, a file validated again) becomes its own."""
        if self.me is None or not self.shared:
            return []
        return [(self.d.sql("INSERT INTO owners (key, node, kind, since) VALUES (?, ?, 'owned', {now}) ON CONFLICT (key) "
                            "DO UPDATE SET node = excluded.node, kind = 'owned', since = excluded.since "
                            "WHERE owners.kind = 'seen'"), (key, self.me[0]))]

    def release_statements(self, keys: Iterable[str]) -> list[Statement]:
        """A file left sending/ (or changed): nobody owns it any more."""
        return [(self.d.sql(f"DELETE FROM owners WHERE key IN ({_marks(chunk)})"), tuple(chunk))
                for chunk in _chunks(list(keys))]

    def identity(self) -> str:
        """This journal's id, made once: gateways on one spool must all use the same journal."""
        import uuid

        found = self._q("SELECT value FROM meta WHERE key = 'journal_id'")
        if found:
            return str(found[0][0])
        self._tx([("INSERT INTO meta (key, value) VALUES ('journal_id', ?) ON CONFLICT (key) DO NOTHING",
                   (str(uuid.uuid4()),))])
        return str(self._q("SELECT value FROM meta WHERE key = 'journal_id'")[0][0])


def _health(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _chunks(keys: list[str]) -> list[list[str]]:
    return [keys[i:i + CHUNK] for i in range(0, len(keys), CHUNK)]


def _marks(chunk: list[str]) -> str:
    return ",".join("?" * len(chunk))


__all__ = ["NodeBook", "Dialect", "SQLITE", "POSTGRES", "SCHEMA", "LeaseLost"]


class NodeMethods:
    """The Journal protocol's node methods, for a backend that keeps a NodeBook as `self._nodes`."""

    _nodes: NodeBook
    shared = False

    @property
    def identity(self) -> str:
        """This journal's id (see NodeBook.identity)."""
        return self._nodes.identity()

    def clock(self) -> float:
        """The journal's time."""
        return self._nodes.clock()

    def node(self, name: str) -> NodeState | None:
        """One node's state, or None."""
        return self._nodes.node(name)

    def nodes(self) -> list[NodeState]:
        """Every node that ever joined."""
        return self._nodes.nodes()

    def join(self, name: str, host: str, pid: int, expect_epoch: int) -> int | None:
        """A new incarnation of `name`; None when its epoch moved meanwhile."""
        return self._nodes.join(name, host, pid, expect_epoch)

    def beat(self, name: str, epoch: int, health: dict[str, Any]) -> bool:
        """Renew this incarnation's lease; False when it was taken over."""
        return self._nodes.beat(name, epoch, health)

    def leave(self, name: str, epoch: int) -> None:
        """A clean stop."""
        self._nodes.leave(name, epoch)

    def fence(self, name: str, epoch: int) -> None:
        """Writes of this journal run only while `name` is at `epoch`."""
        self._nodes.me = (name, epoch)

    def take_over(self, name: str, epoch: int, lease: float) -> dict[str, int]:
        """Take over the nodes silent for `lease` seconds."""
        return self._nodes.take_over(name, epoch, lease)

    def reserve(self, name: str, epoch: int, keys: list[str], lease: float) -> set[str]:
        """The inbox keys this node may claim."""
        return self._nodes.reserve(name, epoch, keys, lease)

    def claimed(self, name: str, reserved: list[str], owned: list[str]) -> None:
        """Reservations go; the claimed files are this node's."""
        self._nodes.claimed(name, reserved, owned)

    def owners(self, keys: list[str]) -> dict[str, str]:
        """The owner of each key that has one."""
        return self._nodes.owners(keys)

    def adopt(self, name: str, epoch: int, keys: list[str], grace: float) -> list[str]:
        """Unowned files, seen `grace` seconds ago, become this node's."""
        return self._nodes.adopt(name, epoch, keys, grace)
