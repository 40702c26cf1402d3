"""The backlog in the PostgreSQL journal, as sqlite_backlog is SQLite's: valid files in sending/ that no
engine holds in memory, waiting with their rows, marked, and taken in page by page (#14 item 7).

The columns, the mark and what counts as owed are sqlite_backlog's (FACTS, OWED, SET_FACTS, ROW_COLUMNS); the
statements are written as there, with `?`, and put in PostgreSQL's dialect by nodes_book.POSTGRES, as the
nodes' SQL is. What differs is what several gateways need: a node takes into its window only files it owns
(nodes_book's `owners`: claimed by it, adopted, or taken over from a dead node), so that each file is sent
once per PACS by one node; a page is taken in one statement that skips rows another transaction holds; and
every write of a fenced node first checks that its lease is still its own (LeaseLost otherwise).
"""

from __future__ import annotations

from typing import Any, Iterable

from relaypacsd.journal import Backlogged, DeliveryRow, FileFacts
from relaypacsd.nodes_book import POSTGRES, NodeBook
from relaypacsd.pg_db import PgDatabase
from relaypacsd.sqlite_backlog import CHUNK, FACTS, OWED, ROW_COLUMNS


def _column(column: str) -> str:
    # size is NULL in rows written before the journal kept facts: such a file is read again when taken in.
    return "BIGINT" if column == "size" else "TEXT NOT NULL DEFAULT ''"


SCHEMA = "".join(f"ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS {c} {_column(c)};\n" for c in FACTS) + f"""
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS backlog SMALLINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS deliveries_backlog ON deliveries(dest, next_try, first_seen, path)
    WHERE backlog = 1 AND {OWED};
"""
WAITING = f"d.backlog = 1 AND d.{OWED}"
# Of this node's files only (when fenced): the owners row its claim, adoption or takeover wrote.
MINE = " AND EXISTS (SELECT 1 FROM owners o WHERE o.key = d.path AND o.node = ? AND o.kind = 'owned')"
# Does any other node own a file? Two ranges of owners' node index around this node's name ('' is a 'seen' row's).
OTHERS_OWN = ("SELECT 1 FROM (SELECT kind FROM owners WHERE node > '' AND node < ? UNION ALL "
              "SELECT kind FROM owners WHERE node > ?) o WHERE o.kind = 'owned' LIMIT 1")
# A folder's paths, in byte order whatever the database's collation (journal_pg's C-collated path index).
IN_FOLDER = 'd.path COLLATE "C" >= ? AND d.path COLLATE "C" < ?'

# One statement: pick a page in order (rows another node's transaction holds are skipped, not waited for), take
# the mark off every row of those files, and return the rows with their facts, in the page's order. The order
# is due time, then first sighting (the order files came), then path.
TAKE = f"""
WITH picked AS (
    SELECT d.path, d.next_try, d.first_seen FROM deliveries d
    WHERE {WAITING} AND d.dest = ? AND d.next_try <= ?{{mine}}
    ORDER BY d.next_try, d.first_seen, d.path LIMIT ? FOR UPDATE SKIP LOCKED
), unmarked AS (
    UPDATE deliveries SET backlog = 0 WHERE path IN (SELECT path FROM picked)
    RETURNING {ROW_COLUMNS}, sop, {", ".join(FACTS)}
)
SELECT u.* FROM unmarked u JOIN picked p ON p.path = u.path ORDER BY p.next_try, p.first_seen, p.path
"""


class PgBacklog:
    """The journal's backlog in PostgreSQL: the marks on delivery rows and the queries over them."""

    def __init__(self, store: PgDatabase, nodes: NodeBook):
        self.store, self.nodes = store, nodes

    def _mine(self) -> tuple[str, tuple[Any, ...]]:
        """The ownership condition and its argument once this journal is fenced (a node's), else nothing."""
        me = self.nodes.me
        return ("", ()) if me is None else (MINE, (me[0],))

    def _mine_if_shared(self) -> tuple[str, tuple[Any, ...]]:
        """The ownership condition for the figures, only while another node owns files: alone, every file in
        the backlog is this node's (its ensure made it so), and a million-row count need not join owners."""
        me = self.nodes.me
        if me is None or not self.store.query(POSTGRES.sql(OTHERS_OWN), (me[0], me[0])):
            return "", ()
        return MINE, (me[0],)

    def take(self, dest: str, before: float, limit: int) -> list[Backlogged]:
        """Up to `limit` of this node's files owed to `dest` and due there by `before`, in order, with every row
        of each; unmarked in the same statement: a file is taken once, by one node."""
        if limit <= 0:
            return []
        mine, arg = self._mine()
        found = self.store.transaction([(POSTGRES.sql(TAKE.format(mine=mine)), (dest, before, *arg, limit))],
                                       self.nodes.guard())
        out: dict[str, Backlogged] = {}  # in the page's order (dicts keep it)
        for r in found:
            path, sop, values = r[0], r[9], r[10:]
            entry = out.get(path)
            if entry is None:
                facts = FileFacts(*values) if values[3] is not None and sop else None  # size: None in older rows
                entry = out[path] = Backlogged(path, sop, facts, {})
            entry.rows[r[1]] = DeliveryRow(*r[:9])
        return list(out.values())

    def put_back(self, paths: Iterable[str]) -> None:
        """Mark files as waiting in the backlog again (a node taken over marks nothing: LeaseLost)."""
        chunks = _chunks(list(paths))
        if chunks:
            self.store.transaction([(POSTGRES.sql("UPDATE deliveries SET backlog = 1 WHERE path = ANY(?)"), (chunk,))
                                    for chunk in chunks], self.nodes.guard())

    def marked(self, paths: Iterable[str]) -> set[str]:
        """Those of `paths` in the backlog with a row still owed, whichever node's: the untracked scan of any
        node must leave them alone (their owner's refill takes them)."""
        out: set[str] = set()
        for chunk in _chunks(list(paths)):
            out.update(r[0] for r in self.store.query(POSTGRES.sql(
                f"SELECT DISTINCT d.path FROM deliveries d WHERE {WAITING} AND d.path = ANY(?)"), (chunk,)))
        return out

    def counts(self, dests: Iterable[str]) -> dict[str, int]:
        """This node's files in the backlog per destination owed them."""
        wanted = sorted(set(dests))
        mine, arg = self._mine_if_shared()
        found = dict(self.store.query(POSTGRES.sql(
            f"SELECT d.dest, COUNT(*) FROM deliveries d WHERE {WAITING} AND d.dest = ANY(?){mine} GROUP BY d.dest"),
            (wanted, *arg))) if wanted else {}
        return {d: int(found.get(d, 0)) for d in wanted}

    def under(self, folder: str) -> tuple[int, float | None]:
        """This node's files in the backlog beneath `folder` and their earliest first sighting."""
        prefix = folder.rstrip("/") + "/"
        mine, arg = self._mine_if_shared()
        found = self.store.query(POSTGRES.sql(
            f"SELECT COUNT(DISTINCT d.path), MIN(d.first_seen) FROM deliveries d WHERE {WAITING} AND {IN_FOLDER}{mine}"),
            (prefix, prefix[:-1] + "0", *arg))
        return (int(found[0][0]), found[0][1]) if found else (0, None)


def _chunks(paths: list[str]) -> list[list[str]]:
    return [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
