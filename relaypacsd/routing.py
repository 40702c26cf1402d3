"""Routing rules: which PACS gets which file, decided from its DICOM attributes and where it was dropped.

Independent of the config: config.py builds `Route`s from the [[route]] tables (`condition` raises
BadCondition with the fix); validation, `send`, `verify`, `status` and `relaypacsd route` call `decide`.
Routes are tried in order; the first that matches decides, and one with `continue = true` adds its
destinations and goes on to the next (the shape of mercure's rules and dcm4chee's export rules).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pydicom.datadict

from relaypacsd.dicomfile import UNREADABLE_VRS, attribute_tag
from relaypacsd.errors import RelayPacsError

WATCH, PATH = "watch", "path"  # the keys that are not DICOM keywords: the watch root, the path below inbox/
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # route names go into logs, sidecars and the journal
ROUTING_NEXT_STEP = ("fix the [[route]] tables (`relaypacsd route FILE` shows why nothing matched) or "
                     "ACTIVE_PACS, reload the daemon (SIGHUP), then `relaypacsd retry FILE`")
_SHOWN = 64  # characters of a value shown in a failed condition


class BadCondition(ValueError):
    """A `match` entry that cannot work; the message says what to fix."""


class Unrouted(RelayPacsError):
    """A file that no route sends to an active PACS: it goes to failed/ with stage "routing"."""

    def __init__(self, message: str, decision: "RouteDecision | None" = None, route: str | None = None):
        super().__init__(message)
        self.decision = decision  # the routes tried, for the sidecar
        # The route the file went by: the one it was given earlier (kept), else the decision's ('' none matched)
        self.route = route if route is not None else (decision.name if decision is not None else "")


@dataclass(frozen=True)
class Matcher:
    """One value of a condition: an exact string, `re:` a regex (searched) or `glob:` a shell pattern."""

    written: str
    kind: str  # "exact", "re" or "glob"
    regex: "re.Pattern[str] | None" = None

    def __call__(self, value: str) -> bool:
        if self.regex is None:
            return value == self.written
        if self.kind == "re":
            return self.regex.search(value) is not None
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True)
class Condition:
    """One key of a route's `match`: every key must hold; a list holds when any of its values does."""

    key: str
    matchers: tuple[Matcher, ...]
    written: str | tuple[str, ...]  # as in the config: a list stays a list (`config show` prints it back)
    private: bool = False  # a person's name (VR PN): its value is never shown, in logs or anywhere

    def __post_init__(self) -> None:
        # Exact strings only (the usual Modality = [...]): one set lookup per file, no call per value.
        exact = frozenset(m.written for m in self.matchers) if all(m.regex is None for m in self.matchers) else None
        object.__setattr__(self, "_exact", exact)

    def holds(self, values: Sequence[str] | None) -> bool:
        """True when one of the attribute's values (or, multi-valued, all of them joined by '\\') matches."""
        if values is None:
            return False  # a missing attribute never matches
        exact: frozenset[str] | None = self._exact  # type: ignore[attr-defined]
        if exact is not None:
            if len(values) == 1:
                return values[0] in exact
            return any(v in exact for v in values) or "\\".join(values) in exact
        if any(m(v) for v in values for m in self.matchers):
            return True
        return len(values) > 1 and any(m("\\".join(values)) for m in self.matchers)

    def failure(self, values: Sequence[str] | None) -> str:
        """Why the condition does not hold for `values`, in a technician's words."""
        if values is None:
            return f"{self.key} is missing" if self.key != WATCH else "watch is unknown (not in a watch root)"
        wanted = [m.written for m in self.matchers]
        if self.private:
            return f"{self.key} does not match {_show_list(wanted)}"
        shown = _quote("\\".join(values))
        if all(m.kind == "exact" for m in self.matchers):
            return f"{self.key} is {shown}, not " + (_quote(wanted[0]) if len(wanted) == 1
                                                     else "one of " + ", ".join(_quote(w) for w in wanted))
        return f"{self.key} {shown} does not match {_show_list(wanted)}"


@dataclass(frozen=True)
class Route:
    """One [[route]] table: its name, the conditions a file must meet, its destinations, and `continue`."""

    name: str
    to: tuple[str, ...]
    conditions: tuple[Condition, ...] = ()
    go_on: bool = False  # `continue = true`: add these destinations and try the next route too

    def first_failure(self, attrs: Mapping[str, Sequence[str]], watch: str, path: str) -> str:
        """The first condition this file does not meet, in words; '' when the route matches."""
        failed = self._failing(attrs, watch, path)
        return "" if failed is None else failed[0].failure(failed[1])

    def _failing(self, attrs: Mapping[str, Sequence[str]], watch: str,
                 path: str) -> tuple[Condition, Sequence[str] | None] | None:
        """The first condition that does not hold and the values it saw; None when the route matches."""
        for cond in self.conditions:
            key = cond.key
            values = ((watch,) if watch else None) if key == WATCH else ((path,) if path else None) if key == PATH \
                else attrs.get(key)
            if not cond.holds(values):
                return cond, values
        return None

    def describe(self) -> str:
        """'Modality = ["MG", "DBT"], path = "glob:research/**"' (or 'every file')."""
        return ", ".join(f"{c.key} = {_show_written(c.written)}" for c in self.conditions) or "every file"


@dataclass  # not frozen: one per route tried, for every file (see journal.DeliveryRow)
class Tried:
    """One route tried for a file: did it match, and if not, the condition that failed and what it saw."""

    route: str
    matched: bool
    condition: Condition | None = None
    values: Sequence[str] | None = None

    @property
    def failed(self) -> str:
        """The failed condition in words ('' when the route matched); made only when asked for (a file that
        some route matches never needs the words of the others)."""
        return "" if self.condition is None else self.condition.failure(self.values)

    def to_dict(self) -> dict[str, object]:
        """For sidecars and `route --json`."""
        return {"route": self.route, "matched": self.matched, "failed": self.failed}


@dataclass  # not frozen: one per file (see journal.DeliveryRow)
class RouteDecision:
    """Which routes matched a file (in order), the destinations they give, and every route tried."""

    routes: tuple[str, ...]
    destinations: tuple[str, ...]
    tried: tuple[Tried, ...]

    @property
    def matched(self) -> bool:
        return bool(self.routes)

    @property
    def name(self) -> str:
        """The matched routes' names, comma-joined (what `Item.route`, the journal and the sidecar carry)."""
        return ",".join(self.routes)

    def failures(self) -> str:
        """'mammo: Modality is "CT", not one of "MG", "DBT"; ...' for every route that did not match."""
        return "; ".join(f"{t.route}: {t.failed}" for t in self.tried if not t.matched)


def decide(routes: Sequence[Route], attrs: Mapping[str, Sequence[str]], watch: str, path: str) -> RouteDecision:
    """Try `routes` in order for a file with these attributes (DicomInfo.attrs), dropped into watch root
    `watch` ('' when not in one) at `path` below its inbox/ (posix). Cheap: a few comparisons per route."""
    matched: list[str] = []
    destinations: list[str] = []
    tried: list[Tried] = []
    for route in routes:
        failed = route._failing(attrs, watch, path)
        if failed is not None:
            tried.append(Tried(route.name, False, *failed))
            continue
        tried.append(Tried(route.name, True))
        matched.append(route.name)
        destinations += [d for d in route.to if d not in destinations]
        if not route.go_on:
            break
    return RouteDecision(tuple(matched), tuple(destinations), tuple(tried))


def keywords(routes: Iterable[Route]) -> tuple[str, ...]:
    """The DICOM keywords the routes read (for dicomfile.inspect's `attributes`), sorted."""
    return tuple(sorted({c.key for r in routes for c in r.conditions if c.key not in (WATCH, PATH)}))


def unmatched_reason(decision: RouteDecision) -> str:
    """The sidecar's and log's reason for a file no route matches."""
    return f"no route matches this file ({decision.failures()})"


def inactive_reason(decision: RouteDecision) -> str:
    """The reason for a file whose routes name only PACS that are not active."""
    return (f"route {decision.name} sends this file to {', '.join(decision.destinations)}, none of them active "
            "(ACTIVE_PACS / delivery.active_pacs)")


def kept_inactive_reason(route: str, destinations: Sequence[str]) -> str:
    """The reason for a file in sending/ whose destinations, given earlier, are none of them active now."""
    return (f"this file was given {', '.join(destinations)} (route {route or '(none)'}) before, none of them "
            "active now (ACTIVE_PACS / delivery.active_pacs)")


def start_report(routes: Sequence[Route], active: Iterable[str]) -> list[tuple[str, str]]:
    """(log level, line) to say once when a daemon starts: the routes, and each route's inactive PACS."""
    if not routes:
        return []
    lines = [("INFO", f"routing: {len(routes)} route(s), the first that matches decides: {summary(routes)}")]
    for name, off in inactive(routes, active).items():
        route = next(r for r in routes if r.name == name)
        alone = " (files only it routes go to failed/, stage routing)" if len(off) == len(route.to) else ""
        lines.append(("WARNING", f"route {name}: {', '.join(off)} not active (ACTIVE_PACS / delivery.active_pacs): "
                                 f"skipped{alone}"))
    return lines


def inactive(routes: Iterable[Route], active: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Per route, its destinations that are not active (skipped: said once at start)."""
    on = set(active)
    return {r.name: off for r in routes if (off := tuple(d for d in r.to if d not in on))}


def summary(routes: Sequence[Route]) -> str:
    """One line for the start-up log: 'mammo -> breast-pacs; research -> research (continue); ...'."""
    return "; ".join(f"{r.name} -> {', '.join(r.to)}{' (continue)' if r.go_on else ''}" for r in routes)


def condition(key: str, value: object) -> Condition:
    """Build one condition of `match` from its key and TOML value; BadCondition saying the fix."""
    private = False
    if key not in (WATCH, PATH):
        try:
            _tag, vr = attribute_tag(key)
        except ValueError:
            hint = difflib.get_close_matches(key, list(pydicom.datadict.keyword_dict) + [WATCH, PATH], n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else "use a DICOM keyword (Modality, StudyDescription, ...), " \
                                                             "watch or path"
            raise BadCondition(f"match key {key!r} is not a DICOM keyword: {fix}") from None
        if vr in UNREADABLE_VRS:
            raise BadCondition(f"match key {key!r} holds binary data or a sequence (VR {vr}), which a route cannot "
                               "match: match a text attribute (Modality, StudyDescription, ...)")
        private = vr == "PN"
    if isinstance(value, str):
        written: str | tuple[str, ...] = value
        texts = [value]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        written = tuple(value)
        texts = list(value)
    else:
        raise BadCondition(f"match.{key} = {value!r}: use a string or a non-empty list of strings "
                           "(\"MR\", [\"MG\", \"DBT\"], \"re:(?i)brain\", \"glob:research/**\")")
    return Condition(key, tuple(_matcher(key, t) for t in texts), written, private)


def _matcher(key: str, text: str) -> Matcher:
    if text.startswith("re:"):
        try:
            return Matcher(text, "re", re.compile(text[3:]))
        except re.error as exc:
            raise BadCondition(f"match.{key} = {text!r}: not a valid regular expression ({exc}): fix the pattern") \
                from None
    if text.startswith("glob:"):
        return Matcher(text, "glob", glob_regex(text[5:]))
    return Matcher(text, "exact")


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """A shell pattern as a regex matched against the whole value: `*` and `?` stay within one folder, `**`
    crosses folders (`research/**` is everything below research/, `**/*.dcm` every .dcm), `[...]` a class."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1:end]
            neg = body.startswith("!")
            body = re.escape(body[1:] if neg else body).replace("\\-", "-")
            out.append(f"[{'^' if neg else ''}{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _quote(text: str) -> str:
    text = text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def _show_list(texts: list[str]) -> str:
    return texts[0] if len(texts) == 1 else "any of " + ", ".join(texts)


def _show_written(written: str | tuple[str, ...]) -> str:
    if isinstance(written, str):
        return json.dumps(written, ensure_ascii=False)
    return "[" + ", ".join(json.dumps(w, ensure_ascii=False) for w in written) + "]"
