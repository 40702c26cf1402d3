"""Letting go of held files that no PACS can send now, so that the active window makes room for files another
PACS can take: one that is down, or a file parked for a retry an hour away, must not stall the others once the
window is full. A file let go waits in the backlog with its rows (those say which PACS still owe it and when
its next try is), and is taken in again when it is due at a PACS that is up (Postfix's deferred queue)."""

from __future__ import annotations

from collections import deque
from contextlib import ExitStack
from typing import Iterable, Mapping

from relaypacsd.queues import Destination, Item


def let_go(items: Iterable[Item], destinations: Mapping[str, Destination], later: float) -> list[Item]:
    """Take out of every queue those of `items` that each PACS still owing them cannot send now (down, or parked
    for a retry not before `later`, monotonic; never one in a request), and return them. All queues are locked at once, in name order, so a
    worker cannot take a file between the look and the taking out."""
    items = list(items)
    if not items:
        return []
    names = sorted(destinations)
    with ExitStack() as locks:
        for name in names:
            locks.enter_context(destinations[name].cond)
        ready = {name: set(destinations[name].ready) for name in names}
        chosen: list[Item] = []
        for item in items:
            with item.lock:
                if item.done or not item.pending:
                    continue
                pending = sorted(item.pending)
            if all(d in destinations and _idle_at(destinations[d], item, ready[d], later) for d in pending):
                chosen.append(item)
        gone = set(chosen)
        for name in names:
            dest = destinations[name]
            if gone & ready[name]:
                dest.ready = deque(i for i in dest.ready if i not in gone)
            for item in chosen:
                dest.waiting.pop(item, None)
    return chosen


def _idle_at(dest: Destination, item: Item, ready: set[Item], later: float) -> bool:
    """True when `dest` will not send `item` soon: parked there for a retry not before `later`, or parked or
    ready while `dest` is down."""
    entry = dest.in_request.get(item.info.sop_instance_uid)
    if entry is not None and entry[0] is item:
        return False
    if not dest.healthy:
        return item in dest.waiting or item in ready
    return dest.waiting.get(item, 0.0) > later
