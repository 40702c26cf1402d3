"""The delivery memory's interface: per file and per destination, state, attempts, next try and history.

The folders are the truth; the journal is only memory. Losing it costs duplicate sends, never a file.
`Journal` says what the daemon and the commands need from a backend; `journal_sqlite.SqliteJournal` is
today's, and every backend passes `tests/test_journal_contract.py`. Backends stamp rows with the caller's
clock (`time.time()`): the daemon compares `next_try` and ages with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, TypedDict

if TYPE_CHECKING:
    from relaypacsd.config import Config, Secret

from relaypacsd.history import HistoryQuery, HistoryRecord

JOURNAL_FILE = "journal.sqlite3"  # in the state directory
INSTANCE_MEMORY_DAYS = 365.0
CONFLICT_EVENT = "uid_conflict"  # Outcome.UID_CONFLICT's value: its history event and its counter

HEALTH_UNKNOWN = -1


def health_of(value: int) -> bool | None:
    """A stored health (1 up, 0 down, HEALTH_UNKNOWN) as True (up), False (down) or None (not known yet)."""
    return None if value == HEALTH_UNKNOWN else bool(value)


# Not frozen, like the other values made for every file or answer (each points here: Update, DicomInfo, ...):
# a frozen dataclass's __init__ sets each field through object.__setattr__, 4-8x the cost (3.0 against 0.5 µs
# for HistoryRecord), and a file makes a dozen of them. Nobody changes one: dataclasses.replace makes a new one.
@dataclass
class DeliveryRow:
    """One file's state at one destination."""

    path: str
    dest: str
    state: str
    attempts: int
    next_try: float
    first_seen: float
    last_error: str
    last_code: int | None
    route: str = ""  # the routes that gave the file this destination, comma-joined ('' without [[route]])


@dataclass  # not frozen: see DeliveryRow
class Update:
    """A new state for one file at one destination."""

    path: str
    dest: str
    state: str
    event: str
    detail: str = ""
    attempts: int | None = None
    next_try: float = 0.0
    code: int | None = None
    sop: str = ""     # with a digest, a 'delivered' update is remembered in the lasting instance memory
    digest: str = ""
    record: HistoryRecord | None = None  # the delivery history's record of this answer, written in the same commit


@dataclass(frozen=True)
class KnownInstance:
    """What a PACS confirmed earlier under one SOP Instance UID."""

    digest: str
    path: str
    time: float


@dataclass  # not frozen: see DeliveryRow
class FileFacts:
    """What delivery and its records read of a validated file, kept with its rows: a file outside the engine's
    active window is taken in again from the journal without being read (its SOP Instance UID is the rows'
    `sop`). The history holds the same PatientIDs (the journal file is 0600)."""

    sop_class: str
    study: str
    series: str
    size: int
    digest: str
    patient_id: str = ""
    accession: str = ""
    modality: str = ""


@dataclass  # not frozen: see DeliveryRow
class Ensure:
    """One file's part of `Journal.ensure_many`: the arguments of `Journal.ensure`."""

    path: str
    dests: tuple[str, ...]
    first_seen: float | None = None
    sop: str = ""
    route: str = ""
    keep: bool = False
    facts: FileFacts | None = None
    backlog: bool = False


@dataclass(frozen=True)
class Backlogged:
    """A file taken from the backlog: its SOP Instance UID, what delivery needs of it (None for rows written
    before the journal kept it: the file is validated again) and every destination's row."""

    path: str
    sop: str
    facts: FileFacts | None
    rows: dict[str, DeliveryRow]


class DestinationStats(TypedDict):
    """One destination's health and counters, as `status` shows them (times in seconds since the epoch)."""

    healthy: bool | None
    last_error: str
    last_change: float
    last_success: float | None
    delivered: int
    failed: int
    conflicts: int


@dataclass(frozen=True)
class NodeState:
    """One gateway as the journal knows it (times by the journal's clock, seconds since the epoch)."""

    name: str
    host: str
    pid: int
    epoch: int          # its incarnation: a takeover or a new start bumps it, fencing the old one out
    started: float
    heartbeat: float
    silent: float       # seconds since its last heartbeat, by the journal's clock
    stopped: bool       # it said goodbye (a clean stop): its files may be taken over at once
    taken_by: str       # the node that took its files over ('' while it holds its lease)
    files: int          # files in sending/ it owns
    health: dict[str, Any]  # its own view of each PACS: {pacs: {"healthy": bool, "reason": str}}


class Journal(Protocol):
    """What the daemon and the commands need from a journal. Thread-safe; `JournalError` when it cannot be
    opened or read."""

    def close(self) -> None:
        """Release the journal."""

    def rows(self, path: str) -> dict[str, DeliveryRow]:
        """Every destination's row for one file."""

    def rows_at(self, dest: str, paths: list[str]) -> dict[str, DeliveryRow]:
        """One destination's rows for several files."""

    def rows_of(self, paths: list[str]) -> dict[str, dict[str, DeliveryRow]]:
        """Every destination's rows for several files (an empty dict for a file without rows)."""

    def ensure(self, path: str, dests: Iterable[str], first_seen: float | None = None,
               sop: str = "", route: str = "", keep: bool = False, facts: FileFacts | None = None,
               backlog: bool = False) -> dict[str, DeliveryRow]:
        """Create pending rows for the destinations a file has none for (dropping rows another instance left
        under the same path) and take over a retry's marked copy; return all rows. New rows carry `route`.
        `keep` (routing): a file that still has rows keeps exactly those destinations; none are added. With
        `facts`, every row of the file keeps them, and its place in the backlog (`backlog`: it waits outside
        the active window)."""

    def ensure_many(self, files: list[Ensure]) -> list[dict[str, DeliveryRow]]:
        """`ensure` for several files (distinct paths) in one transaction: all or none; each file's rows, in
        order. Validation's group of files is one commit: a commit per file was most of the journal's cost."""

    # The backlog: valid files in sending/ that no engine holds in memory (its active window is full). They wait
    # with their rows, marked, and are taken in page by page as the window drains (Postfix's incoming queue).

    def take_backlog(self, dest: str, before: float, limit: int) -> list[Backlogged]:
        """Take out of the backlog up to `limit` files owed to `dest` whose next try there is due by `before`
        (wall clock), earliest first, then in the order they came, each with all its rows: no longer marked,
        a file is taken once."""

    def to_backlog(self, paths: Iterable[str]) -> None:
        """Put files back in the backlog (the engine lets go of them; their rows say when each is due)."""

    def backlogged(self, paths: Iterable[str]) -> set[str]:
        """Those of `paths` that wait in the backlog, owed to some destination."""

    def backlog_counts(self, dests: Iterable[str]) -> dict[str, int]:
        """Files waiting in the backlog per destination that is owed them (due or not)."""

    def backlog_under(self, folder: str) -> tuple[int, float | None]:
        """Files waiting in the backlog beneath `folder`, and the earliest first sighting among them (wall clock;
        None when there are none): the dashboard's sending/ figures."""

    def update(self, path: str, dest: str, *, state: str, event: str, detail: str = "",
               attempts: int | None = None, next_try: float = 0.0, code: int | None = None) -> None:
        """Record a new state for one file at one destination, with a history line."""

    def apply(self, updates: list[Update]) -> None:
        """Record several new states at once (one commit), counting deliveries, failures and UID conflicts, with
        each update's history record."""

    def remember(self, updates: list[Update]) -> None:
        """Only the lasting instance memory's part of 'delivered' updates (and their history records); no row
        moves."""

    def record_history(self, records: list[HistoryRecord]) -> None:
        """Add records to the delivery history (one commit): events no row records (a refusal, a requeue)."""

    def find_history(self, query: HistoryQuery) -> list[HistoryRecord]:
        """The newest history records matching `query`, newest first (none from a journal without history)."""

    def prune_history(self, before: float, limit: int) -> int:
        """Drop up to `limit` of the oldest history records older than `before`; return how many went."""

    def known_instances(self, dest: str, sops: Iterable[str]) -> dict[str, KnownInstance]:
        """What `dest` confirmed earlier under these SOP Instance UIDs."""

    def prune_instances(self, limit: int = ...) -> int:
        """Drop up to `limit` remembered instances older than the memory; return how many went."""

    def restore(self, path: str, sop: str, first_seen: float, updates: list[Update], route: str = "") -> None:
        """Write back rows that went missing under a settled file, with a history line; no counter moves."""

    def history(self, path: str) -> list[dict[str, Any]]:
        """The history of one file, oldest first, for its sidecar (time, pacs, event, detail)."""

    def rename(self, old: str, new: str) -> None:
        """Follow a file that moved; rows of a file once at `new` go."""

    def copy(self, old: str, new: str, token: str) -> bool:
        """Give `new` the rows and history of `old` too, marked with `token`, only when `new` holds no rows."""

    def uncopy(self, new: str, token: str) -> None:
        """Take back what copy(old, new, token) wrote, and only that."""

    def forget(self, *paths: str) -> None:
        """Drop the rows and history of files that no longer need them."""

    def sop_of(self, path: str) -> str:
        """The SOP Instance UID the rows of `path` are about ('' when unknown)."""

    def paths_under(self, folder: str, after: str = "", limit: int = 0) -> list[str]:
        """File paths with rows beneath `folder`, in order; a page of `limit` (0: all) of those after `after`."""

    def reset_failed(self, path: str, reason: str = "operator retry") -> list[str]:
        """Operator retry: 'failed' rows back to 'pending'; return the destinations reset."""

    def conflicted(self, path: str) -> set[str]:
        """The destinations whose last word on this file was a UID conflict."""

    def begin_run(self, dests: Iterable[str]) -> None:
        """A daemon (re)starts: every health unknown, each active destination gets its row; counters stay."""

    def set_health(self, dest: str, healthy: bool, error: str = "") -> None:
        """Remember a destination's health (an empty error keeps the last one)."""

    def destinations(self) -> dict[str, DestinationStats]:
        """Health and counters per destination."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of rows per destination and state."""

    def route_counts(self) -> dict[str, int]:
        """Files that some destination still owes (pending or waiting), per route name ('' unrouted)."""

    # -- several gateways: nodes, leases and which node owns which file (relaypacsd.nodes) ---------------

    identity: str  # this journal's id (made once, kept in it): gateways on one spool must share one journal
    shared: bool  # True when several gateways may use it at once (PostgreSQL)

    def clock(self) -> float:
        """The journal's time (the database server's for a shared journal), for leases all nodes agree on."""

    def node(self, name: str) -> NodeState | None:
        """One node's state, or None when it never joined."""

    def nodes(self) -> list[NodeState]:
        """Every node that ever joined, with the files it owns."""

    def join(self, name: str, host: str, pid: int, expect_epoch: int) -> int | None:
        """Start a new incarnation of `name` (its files stay its own); None when its epoch is no longer
        `expect_epoch` (0: it never joined) because another process joined or took it over meanwhile."""

    def beat(self, name: str, epoch: int, health: dict[str, Any]) -> bool:
        """Renew the lease of this incarnation with its view of each PACS; False when it was taken over."""

    def leave(self, name: str, epoch: int) -> None:
        """A clean stop: the node's files may be taken over at once."""

    def fence(self, name: str, epoch: int) -> None:
        """From now on, `apply` and the ownership writes run only while `name` is at `epoch`
        (else LeaseLost, nothing written); `ensure` makes an unowned file this node's."""

    def take_over(self, name: str, epoch: int, lease: float) -> dict[str, int]:
        """Take over every other node silent for `lease` seconds (or stopped): its files become ours and it is
        fenced out. Returns the nodes taken over, with how many files each held."""

    def reserve(self, name: str, epoch: int, keys: list[str], lease: float) -> set[str]:
        """Before claiming files from inbox/: the keys this node may claim (no other node reserved them in the
        last `lease` seconds). On a share where a claim is link + unlink, two nodes could both 'win' one."""

    def claimed(self, name: str, reserved: list[str], owned: list[str]) -> None:
        """After the claims: the reservations go and this node owns the files it moved into sending/."""

    def owners(self, keys: list[str]) -> dict[str, str]:
        """The owning node of each of these files that has one."""

    def adopt(self, name: str, epoch: int, keys: list[str], grace: float) -> list[str]:
        """Files in sending/ that nobody owns (their claimer died before saying so): the first look marks
        them, a look `grace` seconds later (0: at once) makes them ours. Returns those now ours."""


def open_journal(state_dir: Path, *, readonly: bool = False, instance_days: float = INSTANCE_MEMORY_DAYS,
                 url: str = "", password: "Secret | None" = None, application: str = "relaypacsd") -> Journal:
    """The journal: SQLite in `state_dir` unless `url` names a PostgreSQL database (several gateways);
    `readonly` for a command that only looks (no upgrade, no writes)."""
    if url:
        from relaypacsd.config import Secret
        from relaypacsd.journal_pg import PgJournal

        return PgJournal(url, password or Secret(""), instance_days, readonly=readonly, application=application)
    from relaypacsd.journal_sqlite import SqliteJournal  # the backend builds on this module's types

    return SqliteJournal(state_dir / JOURNAL_FILE, readonly=readonly, instance_days=instance_days)


def journal_for(config: "Config", *, readonly: bool = False) -> Journal:
    """The journal `config` names: SQLite in state_dir (one gateway: rows keyed by this host's paths), or the
    shared PostgreSQL journal of [journal] url, whose rows are keyed by watch-root names (relaypacsd.journal_keys),
    since the gateways sharing it may mount the spool at different paths."""
    from relaypacsd.config import journal_password

    inner = open_journal(Path(config.daemon.state_dir), readonly=readonly, url=config.journal.url,
                         password=journal_password(config.journal), application=f"relaypacsd {config.node}")
    if not config.journal.url:
        return inner
    from relaypacsd.journal_keys import KeyedJournal, RootKeys

    return KeyedJournal(inner, RootKeys((w.path, w.name) for w in config.watch))  # type: ignore[return-value]
