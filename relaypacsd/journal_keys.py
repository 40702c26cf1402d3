"""The journal keyed by watch-root NAME and the path below it, not by where this host mounts the root.

Gateways sharing a spool may mount the share at different paths (/mnt/pacs here, /srv/share there): a file
is `ct/sending/CT1/IM0001` in the journal for all of them. `KeyedJournal` wraps any backend and turns the
paths the daemon and the commands use into keys on the way in, and keys back into this host's paths on the
way out. A path outside every watch root (tests, an old journal's row) is its own key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

from relaypacsd.journal import Backlogged, DeliveryRow, Ensure, Journal, KnownInstance, Update


class RootKeys:
    """Paths below the watch roots <-> journal keys ('NAME/folder/...')."""

    def __init__(self, roots: Iterable[tuple[str | Path, str]]):
        pairs = [(os.path.normpath(str(root)), name) for root, name in roots]
        self._roots = sorted(((root + os.sep, name) for root, name in pairs), key=lambda p: -len(p[0]))
        self._names = {name: root for root, name in pairs}

    def key(self, path: str | Path) -> str:
        """The journal key of a path ('/mnt/pacs/ct/sending/a.dcm' -> 'ct/sending/a.dcm')."""
        text = os.fspath(path)
        for prefix, name in self._roots:
            if text.startswith(prefix):
                return name + text[len(prefix) - 1:]
        return text

    def path(self, key: str) -> str:
        """This host's path of a journal key (a key of a root not configured here stays as it is)."""
        if key.startswith("/"):
            return key
        name, _, rest = key.partition("/")
        root = self._names.get(name)
        return key if root is None else root + "/" + rest


class KeyedJournal:
    """A journal whose callers speak in paths while its rows are keyed by watch-root names. Each method is the
    Journal protocol's own (see relaypacsd.journal), with paths turned into keys on the way in and back on the
    way out; what takes no path (health, counters, the delivery history, nodes) passes through."""

    def __init__(self, journal: Journal, keys: RootKeys):
        self.inner, self.keys = journal, keys
        self._k, self._p = keys.key, keys.path

    def __getattr__(self, name: str) -> Any:  # what takes no path (health, counters, nodes) passes through
        return getattr(self.inner, name)

    def _row(self, row: DeliveryRow) -> DeliveryRow:
        return dataclasses.replace(row, path=self._p(row.path))

    def _update(self, u: Update) -> Update:
        return dataclasses.replace(u, path=self._k(u.path))

    def rows(self, path: str) -> dict[str, DeliveryRow]:
        return {d: self._row(r) for d, r in self.inner.rows(self._k(path)).items()}

    def rows_at(self, dest: str, paths: list[str]) -> dict[str, DeliveryRow]:
        back = {self._k(p): p for p in paths}
        return {back[k]: dataclasses.replace(r, path=back[k]) for k, r in self.inner.rows_at(dest, list(back)).items()}

    def rows_of(self, paths: list[str]) -> dict[str, dict[str, DeliveryRow]]:
        back = {self._k(p): p for p in paths}
        found = self.inner.rows_of(list(back))
        return {back[k]: {d: dataclasses.replace(r, path=back[k]) for d, r in rows.items()} for k, rows in found.items()}

    def ensure(self, path: str, dests: Iterable[str], first_seen: float | None = None, sop: str = "",
               **options: Any) -> dict[str, DeliveryRow]:
        return {d: dataclasses.replace(r, path=path)
                for d, r in self.inner.ensure(self._k(path), dests, first_seen, sop, **options).items()}

    def ensure_many(self, files: list[Ensure]) -> list[dict[str, DeliveryRow]]:
        found = self.inner.ensure_many([dataclasses.replace(f, path=self._k(f.path)) for f in files])
        return [{d: dataclasses.replace(r, path=f.path) for d, r in rows.items()} for f, rows in zip(files, found)]

    def update(self, path: str, dest: str, **kwargs: Any) -> None:
        self.inner.update(self._k(path), dest, **kwargs)

    def apply(self, updates: list[Update]) -> None:
        self.inner.apply([self._update(u) for u in updates])

    def remember(self, updates: list[Update]) -> None:
        self.inner.remember([self._update(u) for u in updates])

    def known_instances(self, dest: str, sops: Iterable[str]) -> dict[str, KnownInstance]:
        return {s: dataclasses.replace(k, path=self._p(k.path)) for s, k in self.inner.known_instances(dest, sops).items()}

    def restore(self, path: str, sop: str, first_seen: float, updates: list[Update], **options: Any) -> None:
        self.inner.restore(self._k(path), sop, first_seen, [self._update(u) for u in updates], **options)

    def history(self, path: str) -> list[dict[str, Any]]:
        return self.inner.history(self._k(path))

    def rename(self, old: str, new: str) -> None:
        self.inner.rename(self._k(old), self._k(new))

    def copy(self, old: str, new: str, token: str) -> bool:
        return self.inner.copy(self._k(old), self._k(new), token)

    def uncopy(self, new: str, token: str) -> None:
        self.inner.uncopy(self._k(new), token)

    def forget(self, *paths: str) -> None:
        self.inner.forget(*(self._k(p) for p in paths))

    def sop_of(self, path: str) -> str:
        return self.inner.sop_of(self._k(path))

    def paths_under(self, folder: str, after: str = "", limit: int = 0) -> list[str]:
        return [self._p(k) for k in self.inner.paths_under(self._k(folder), self._k(after) if after else "", limit)]

    def reset_failed(self, path: str, reason: str = "operator retry") -> list[str]:
        return self.inner.reset_failed(self._k(path), reason)

    def conflicted(self, path: str) -> set[str]:
        return self.inner.conflicted(self._k(path))

    # -- the backlog, in paths too ----------------------------------------------------------------------

    def take_backlog(self, dest: str, before: float, limit: int) -> list[Backlogged]:
        return [dataclasses.replace(b, path=self._p(b.path), rows={d: self._row(r) for d, r in b.rows.items()})
                for b in self.inner.take_backlog(dest, before, limit)]

    def to_backlog(self, paths: Iterable[str]) -> None:
        self.inner.to_backlog([self._k(p) for p in paths])

    def backlogged(self, paths: Iterable[str]) -> set[str]:
        back = {self._k(p): p for p in paths}
        return {back[k] for k in self.inner.backlogged(list(back))}

    def backlog_under(self, folder: str) -> tuple[int, float | None]:
        return self.inner.backlog_under(self._k(folder))

    # -- ownership, in paths too -------------------------------------------------------------------

    def reserve(self, name: str, epoch: int, paths: list[str], lease: float) -> set[str]:
        back = {self._k(p): p for p in paths}
        return {back[k] for k in self.inner.reserve(name, epoch, list(back), lease)}

    def claimed(self, name: str, reserved: list[str], owned: list[str]) -> None:
        self.inner.claimed(name, [self._k(p) for p in reserved], [self._k(p) for p in owned])

    def owners(self, paths: list[str]) -> dict[str, str]:
        back = {self._k(p): p for p in paths}
        return {back[k]: node for k, node in self.inner.owners(list(back)).items()}

    def adopt(self, name: str, epoch: int, paths: list[str], grace: float) -> list[str]:
        back = {self._k(p): p for p in paths}
        return [back[k] for k in self.inner.adopt(name, epoch, list(back), grace)]
