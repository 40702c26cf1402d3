"""Load relaypacs.toml, apply the operators' environment variables, validate, and mask secrets."""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import ssl
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from relaypacsd.errors import ConfigError

if TYPE_CHECKING:  # routing imports pydicom: only a config with [[route]] tables pays for it (see _routes)
    from relaypacsd.routing import Route

DEFAULT_CONFIG_PATH = Path("/etc/relaypacs/relaypacs.toml")
PACS_TYPES = ("orthanc", "dcm4chee", "dicomweb")
OBSERVERS = ("auto", "native", "polling")
MASK = "********"


class Secret:
    """A password or token: prints as a mask everywhere, so it never reaches a log or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        """The real value, for the one place that must send it."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class DaemonConfig:
    """Process-wide settings."""

    state_dir: str = "/var/lib/relaypacs"
    log_level: str = "INFO"
    log_format: str = "text"
    log_file: str = ""
    log_rotation: str = "50 MB"
    log_retention: str = "14 days"
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    heartbeat_interval: float = 5.0
    node: str = ""  # this gateway's name, unique on the spool; "" = the host name (see Config.node)
    lease_seconds: float = 30.0  # a node silent this long is presumed dead; its files are taken over


@dataclass(frozen=True)
class JournalConfig:
    """Where the delivery memory lives: SQLite in state_dir (one gateway), or a shared PostgreSQL (several)."""

    url: str = ""  # "" = SQLite; "postgresql://relaypacs@db.example.org/relaypacs" for several gateways
    password_file: str = ""

    @property
    def shared(self) -> bool:
        """True for a database that several gateways share (PostgreSQL)."""
        return bool(self.url)


@dataclass(frozen=True)
class DeliveryConfig:
    """How and when files are forwarded."""

    enabled: bool = True
    active_pacs: tuple[str, ...] = ()
    retry_attempts: int = 3
    retry_delay: float = 2.0
    retry_sweep_interval: float = 30.0
    retry_backoff_max: float = 3600.0
    max_age_hours: float = 72.0
    health_interval: float = 30.0
    batch_max_instances: int = 50
    batch_max_bytes: int = 64 * 1024 * 1024
    workers_per_pacs: int = 4
    sent_retention_days: float = 0.0
    strict_meta_uid: bool = False
    active_window: int = 20000  # files held in memory; the rest wait in sending/ with their journal rows
    history_days: float = 365.0  # the delivery history (relaypacsd.history) is kept this long; 0: none kept


@dataclass(frozen=True)
class WebConfig:
    """The dashboard and its JSON API, served by the daemon itself (relaypacsd.web); off while port is 0."""

    address: str = "127.0.0.1"
    port: int = 0
    users_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class WatchConfig:
    """One watch root: its inbox/, sending/, sent/ and failed/ live beneath `path`."""

    path: str = ""
    name: str = ""  # stable across nodes (hosts may mount the share elsewhere); default: the path's last part
    observer: str = "auto"
    settle_seconds: float = 2.0
    poll_interval: float = 1.0
    rescan_interval: float = 30.0
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class PacsConfig:
    """One PACS: where it is, how to log in, and how to reach its DICOM port for C-STORE."""

    name: str = ""
    type: str = "dicomweb"
    url: str = ""
    dicomweb_root: str = ""
    username: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    password_file: str = ""
    token: Secret = field(default_factory=lambda: Secret(""))
    token_file: str = ""
    oauth2_token_url: str = ""
    client_id: str = ""
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    client_secret_file: str = ""
    oauth2_scope: str = ""
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""
    verify_tls: bool = True
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    ae_title: str = ""
    calling_ae_title: str = "RELAYPACS_GW"
    dicom_host: str = ""
    dicom_port: int = 0
    fallback: str = ""

    @property
    def stow_base(self) -> str:
        """The DICOMweb root URL (no trailing slash) for this PACS type."""
        if self.dicomweb_root:
            root = self.dicomweb_root
            if root.startswith("http://") or root.startswith("https://"):
                return root.rstrip("/")
            return self.url.rstrip("/") + "/" + root.strip("/")
        base = self.url.rstrip("/")
        if self.type == "orthanc":
            return base + "/dicom-web"
        if self.type == "dcm4chee":
            return f"{base}/dcm4chee-arc/aets/{self.ae_title or 'DCM4CHEE'}/rs"
        return base


@dataclass(frozen=True)
class AuditConfig:
    """DICOM audit messages (PS3.15 A.5) to an ATNA audit repository over syslog; off while `syslog` is empty."""

    syslog: str = ""  # tcp://host:port, udp://host:port or tls://host:port
    ca_bundle: str = ""  # tls://: the CA that signed the repository's certificate (else the system's)
    client_cert: str = ""  # tls://: our certificate, for repositories that require mutual TLS (IHE ATNA does)
    client_key: str = ""
    source_id: str = "RELAYPACS_GW"  # AuditSourceID: this gateway, as the auditors know it
    queue_size: int = 10000  # messages kept while the repository is away; beyond, dropped and counted


@dataclass(frozen=True)
class Config:
    """The effective configuration: file, then environment, validated."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    watch: tuple[WatchConfig, ...] = ()
    pacs: Mapping[str, PacsConfig] = field(default_factory=dict)
    audit: AuditConfig = field(default_factory=AuditConfig)
    source: str = ""
    routes: tuple["Route", ...] = ()  # [[route]] tables in order; none: every file to every active PACS
    web: WebConfig = field(default_factory=WebConfig)

    def active(self) -> list[PacsConfig]:
        """The PACS that files are forwarded to, in ACTIVE_PACS order."""
        return [self.pacs[n] for n in self.delivery.active_pacs]

    @property
    def node(self) -> str:
        """This gateway's node name: daemon.node, else the host name (read when asked: build_config stays pure)."""
        return self.daemon.node or socket.gethostname()


# Keys the operators' environment already uses, mapped to [delivery].
_DELIVERY_ENV = {
    "PACS_ENABLED": "enabled",
    "ACTIVE_PACS": "active_pacs",
    "PACS_RETRY_ATTEMPTS": "retry_attempts",
    "PACS_RETRY_DELAY": "retry_delay",
}
_PACS_ENV_SUFFIXES = {
    "URL": "url",
    "USERNAME": "username",
    "PASSWORD": "password",
    "AE_TITLE": "ae_title",
    "PASSWORD_FILE": "password_file",
    "TOKEN": "token",
    "TYPE": "type",
}
_SECRET_FILES = {"password_file": "password", "token_file": "token", "client_secret_file": "client_secret"}
# Variables that set the gateways' keys (Docker: one image, each container its own node name).
_JOURNAL_ENV = {"RELAYPACS_JOURNAL_URL": ("journal", "url"), "RELAYPACS_JOURNAL_PASSWORD_FILE": ("journal", "password_file"),
                "RELAYPACS_NODE": ("daemon", "node")}
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # node and watch-root names: they key the journal's rows
# Names whose environment variables are honoured even when no file mentions them.
_WELL_KNOWN_PACS = ("orthanc", "dcm4chee")


def find_config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """`--config`, then $RELAYPACS_CONFIG, then /etc/relaypacs/relaypacs.toml; None when none exists."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if environ.get("RELAYPACS_CONFIG"):
        return Path(environ["RELAYPACS_CONFIG"])
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the file (when given), apply the environment, validate; raise ConfigError on any problem."""
    environ = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    source = "(no file)"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found: create it with `relaypacsd init --config {path}`") from None
        except PermissionError:
            raise ConfigError(f"{path}: not readable by this user: fix its permissions (chmod 640, group of the service)") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory: point --config at the relaypacs.toml file inside it") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}): fix the syntax at that line") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text (TOML must be): save it as UTF-8 (iconv -t UTF-8)") from None
    return build_config(raw, environ, source)


def build_config(raw: Mapping[str, Any], environ: Mapping[str, str], source: str = "") -> Config:
    """Turn parsed TOML plus environment into a validated Config."""
    where = source or "config"
    _reject_unknown(raw, {"daemon", "journal", "delivery", "watch", "pacs", "audit", "route", "web"}, "", where)

    tables = {"daemon": dict(_as_table(raw.get("daemon", {}), "daemon", where)),
              "journal": dict(_as_table(raw.get("journal", {}), "journal", where))}
    for var, (table, key) in _JOURNAL_ENV.items():
        if var in environ:
            tables[table][key] = environ[var].strip()
    daemon = _section(DaemonConfig, tables["daemon"], "daemon", where)
    journal = _section(JournalConfig, tables["journal"], "journal", where)
    web = _section(WebConfig, raw.get("web", {}), "web", where)
    delivery_raw = dict(_as_table(raw.get("delivery", {}), "delivery", where))
    for var, key in _DELIVERY_ENV.items():
        if var in environ:
            delivery_raw[key] = _from_env(var, environ[var], DeliveryConfig, key)
    delivery = _section(DeliveryConfig, delivery_raw, "delivery", where)

    watch_raw = raw.get("watch", [])
    if isinstance(watch_raw, dict):
        watch_raw = [watch_raw]
    if not isinstance(watch_raw, list):
        raise ConfigError(f"{where}: 'watch' must be a list of [[watch]] tables, each with path = \"/srv/relaypacs/...\"")
    watches = tuple(_named(_section(WatchConfig, w, f"watch[{i}]", where)) for i, w in enumerate(watch_raw))

    pacs_raw = {name: dict(_as_table(tbl, f"pacs.{name}", where)) for name, tbl in _as_table(raw.get("pacs", {}), "pacs", where).items()}
    names = list(pacs_raw)
    for name in list(delivery.active_pacs) + list(_WELL_KNOWN_PACS):
        if name not in names:
            names.append(name)
    pacs: dict[str, PacsConfig] = {}
    for name in names:
        table = pacs_raw.get(name, {})
        prefix = pacs_env_prefix(name)
        from_env = {key: _from_env(prefix + suf, environ[prefix + suf], PacsConfig, key)
                    for suf, key in _PACS_ENV_SUFFIXES.items() if prefix + suf in environ}
        if name not in pacs_raw and "url" not in from_env:
            continue  # a well-known name nobody configured
        table.update(from_env)
        table.setdefault("type", name if name in PACS_TYPES else "dicomweb")
        table["name"] = name
        pacs[name] = _section(PacsConfig, table, f"pacs.{name}", where)

    if not delivery.active_pacs:
        delivery = _replace(delivery, active_pacs=tuple(pacs))
    audit = _section(AuditConfig, raw.get("audit", {}), "audit", where)
    routes = _routes(raw.get("route", []), pacs, where)
    config = Config(daemon=daemon, journal=journal, delivery=delivery, watch=watches, pacs=pacs, audit=audit,
                    source=source, routes=routes, web=web)
    validate(config, where)
    return config


_ROUTE_KEYS = {"name", "match", "to", "continue"}


def _routes(raw: Any, pacs: Mapping[str, PacsConfig], where: str) -> tuple["Route", ...]:
    """The [[route]] tables, each checked: a name, known DICOM keywords, valid patterns, configured PACS."""
    if isinstance(raw, list) and not raw:
        return ()
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where}: 'route' must be a list of [[route]] tables, each with name, match and to")
    from relaypacsd import routing  # pydicom's dictionary: only for configs that route

    routes: list[routing.Route] = []
    for i, table in enumerate(raw):
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: route[{i}] has no name: give it name = \"mammo\" (names show in logs, "
                              "sidecars and `relaypacsd route`)")
        label = f"{where}: route {name!r}"
        if not routing.NAME_RE.match(name):
            raise ConfigError(f"{label}: use letters, digits, '-', '_' and '.' in a route name (at most 64)")
        if any(r.name == name for r in routes):
            raise ConfigError(f"{label}: two routes have this name: give each route its own")
        for key in table:
            if key not in _ROUTE_KEYS:
                hint = difflib.get_close_matches(key, sorted(_ROUTE_KEYS), n=1)
                raise ConfigError(f"{label}: unknown key {key!r}: " + (f"did you mean {hint[0]!r}?" if hint else
                                  f"known keys: {', '.join(sorted(_ROUTE_KEYS))}"))
        go_on = table.get("continue", False)
        if not isinstance(go_on, bool):
            raise ConfigError(f"{label}: continue = {go_on!r} must be true or false")
        to = table.get("to")
        to = [to] if isinstance(to, str) else to
        if not isinstance(to, list) or not to or not all(isinstance(d, str) for d in to):
            raise ConfigError(f"{label}: to must name the PACS it sends to, e.g. to = [\"orthanc\"]")
        for dest in to:
            if dest not in pacs:
                known = ", ".join(sorted(pacs)) or "none"
                fix = (f"did you mean {dest.lower()!r}? PACS names are lower case" if dest.lower() in pacs else
                       f"add a [pacs.{dest}] table with a url, or fix the name")
                raise ConfigError(f"{label}: to names {dest!r}, which is not configured (configured: {known}): {fix}")
        match = table.get("match", {})
        if not isinstance(match, dict):
            raise ConfigError(f"{label}: match must be a table, e.g. match = {{ Modality = [\"MG\", \"DBT\"] }}")
        try:
            conditions = tuple(routing.condition(key, value) for key, value in match.items())
        except routing.BadCondition as exc:
            raise ConfigError(f"{label}: {exc}") from None
        if routes and not routes[-1].conditions and not routes[-1].go_on:
            raise ConfigError(f"{where}: route {routes[-1].name!r} matches every file, so route {name!r} after it "
                              f"is never tried: put {routes[-1].name!r} last, or give it continue = true")
        routes.append(routing.Route(name, tuple(dict.fromkeys(to)), conditions, go_on))
    return tuple(routes)


def validate(config: Config, where: str = "config") -> None:
    """Cross-key checks; raise ConfigError naming the key and the fix."""
    d = config.daemon
    if d.log_format not in ("text", "json"):
        raise ConfigError(f"{where}: daemon.log_format = {d.log_format!r}: use \"text\" or \"json\"")
    if d.log_level.upper() not in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{where}: daemon.log_level = {d.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    if not 0 <= d.metrics_port <= 65535:
        raise ConfigError(f"{where}: daemon.metrics_port = {d.metrics_port}: use 0 (off) or a port 1-65535")
    _check_numbers(config, where)
    dl = config.delivery
    # retry_attempts, retry_delay, workers_per_pacs and batch_max_instances: bounded in _LIMITS
    if dl.batch_max_bytes < 1:
        raise ConfigError(f"{where}: delivery.batch_max_bytes = {dl.batch_max_bytes}: must be 1 or more")
    for key in ("retry_sweep_interval", "health_interval", "max_age_hours", "retry_backoff_max"):
        if getattr(dl, key) <= 0:
            raise ConfigError(f"{where}: delivery.{key} = {getattr(dl, key)}: must be a number of seconds/hours above 0")
    if dl.sent_retention_days < 0:
        raise ConfigError(f"{where}: delivery.sent_retention_days = {dl.sent_retention_days:g}: use 0 (keep) or more")
    for name in dl.active_pacs:
        if name not in config.pacs:
            known = ", ".join(sorted(config.pacs)) or "none"
            if name.lower() in config.pacs:
                raise ConfigError(f"{where}: ACTIVE_PACS / delivery.active_pacs names {name!r}: did you mean "
                                  f"{name.lower()!r}? PACS names are lower case")
            raise ConfigError(
                f"{where}: ACTIVE_PACS / delivery.active_pacs names {name!r}, which is not configured (configured: {known}): "
                f"add a [pacs.{name}] table with a url, or set {pacs_env_prefix(name)}URL")
    if not os.path.isabs(d.state_dir):
        raise ConfigError(f"{where}: daemon.state_dir = {d.state_dir!r}: use an absolute path (the service does not "
                          "run from this folder)")
    for i, w in enumerate(config.watch):
        if not w.path:
            raise ConfigError(f"{where}: watch[{i}].path is missing: set path = \"/srv/relaypacs/<modality>\"")
        if not os.path.isabs(w.path):
            raise ConfigError(f"{where}: watch[{i}].path = {w.path!r}: use an absolute path (the service does not run "
                              f"from this folder): {os.path.abspath(w.path)!r}?")
        if w.observer not in OBSERVERS:
            raise ConfigError(f"{where}: watch[{i}].observer = {w.observer!r}: use \"auto\", \"native\" or \"polling\"")
        for key in ("settle_seconds", "poll_interval", "rescan_interval"):
            if getattr(w, key) <= 0:
                raise ConfigError(f"{where}: watch[{i}].{key} = {getattr(w, key)}: must be above 0 seconds")
    paths = [os.path.abspath(w.path) for w in config.watch]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"{where}: two [[watch]] tables have the same path: give each watch root its own folder")
    _validate_gateways(config, where)
    for p in config.pacs.values():
        _validate_pacs(p, where)
    _validate_web(config.web, where)
    _validate_audit(config.audit, where)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses no other machine can reach."""
    import ipaddress

    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _validate_web(w: WebConfig, where: str) -> None:
    """The dashboard's keys: a port, TLS files that exist and go together, never an open address without users."""
    if not 0 <= w.port <= 65535:
        raise ConfigError(f"{where}: web.port = {w.port}: use 0 (off) or a port 1-65535")
    if not w.port:
        return
    if bool(w.tls_cert) != bool(w.tls_key) and not _pem_holds_key(w.tls_cert):
        raise ConfigError(f"{where}: web.tls_cert and web.tls_key go together: set both (or a PEM holding both as tls_cert)")
    for key in ("tls_cert", "tls_key"):  # users_file is read when the server starts: `user add` creates it
        if getattr(w, key) and not os.path.isfile(getattr(w, key)):
            raise ConfigError(f"{where}: web.{key} = {getattr(w, key)!r}: no such file: fix the path")
    if not w.users_file and not is_loopback(w.address):
        # Without accounts the dashboard has no login: on a network address anyone could read it.
        raise ConfigError(f"{where}: web.address = {w.address!r} without web.users_file: the dashboard would be open "
                          "to the network without a login: add users (`relaypacsd user add NAME --role operator`, "
                          "then set web.users_file) or use address = \"127.0.0.1\" and an SSH tunnel")


# Bounds a sane setup stays far inside: beyond them a value is a typo (and some would exhaust the machine).
_LIMITS: dict[str, tuple[float, float, str]] = {
    "daemon.heartbeat_interval": (0.1, 3600, "seconds"),
    "daemon.lease_seconds": (1, 86400, "seconds"),
    "delivery.retry_attempts": (1, 100, ""),
    "delivery.retry_delay": (0.001, 3600, "seconds"),
    "delivery.workers_per_pacs": (1, 64, ""),
    "delivery.batch_max_instances": (1, 10000, ""),
    "delivery.active_window": (1, 999_999, "files"),
    "delivery.history_days": (0, 36500, "days (0: no history)"),
    "pacs.connect_timeout": (0.001, 3600, "seconds"),
    "pacs.read_timeout": (0.001, 86400, "seconds"),
    "pacs.dicom_port": (0, 65535, "(0: none)"),
    "web.port": (0, 65535, "(0: off)"),
    "audit.queue_size": (1, 1_000_000, "messages"),
}
_ENV_OF = {"delivery.retry_attempts": "PACS_RETRY_ATTEMPTS", "delivery.retry_delay": "PACS_RETRY_DELAY"}


def _check_numbers(config: Config, where: str) -> None:
    """Every number finite (no nan/inf) and inside _LIMITS."""
    sections: list[tuple[str, str, Any]] = [("daemon", "daemon", config.daemon), ("delivery", "delivery", config.delivery)]
    sections += [(f"watch[{i}]", "watch", w) for i, w in enumerate(config.watch)]
    sections += [(f"pacs.{p.name}", "pacs", p) for p in config.pacs.values()]
    sections.append(("web", "web", config.web))
    sections += [("audit", "audit", config.audit)]
    for key, kind, obj in sections:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            env = f" (or {_ENV_OF[f'{kind}.{f.name}']})" if f"{kind}.{f.name}" in _ENV_OF else ""
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {key}.{f.name}{env} = {value}: must be a finite number")
            low, high, unit = _LIMITS.get(f"{kind}.{f.name}", (-math.inf, math.inf, ""))
            if not low <= value <= high:
                raise ConfigError(f"{where}: {key}.{f.name}{env} = {value:g}: use {low:g} to {high:g} {unit}".rstrip())


def _named(w: WatchConfig) -> WatchConfig:
    """A watch root without a name gets its path's last part (/srv/relaypacs/ct -> ct)."""
    return w if w.name else _replace(w, name=os.path.basename(w.path.rstrip("/")))


def _validate_gateways(config: Config, where: str) -> None:
    """[journal], daemon.node and lease_seconds, and the watch roots' names (the journal's keys)."""
    d, j = config.daemon, config.journal
    if d.node and not re.fullmatch(NAME_PATTERN, d.node):
        raise ConfigError(f"{where}: daemon.node (or RELAYPACS_NODE) = {d.node!r}: use letters, digits, '.', '_' or "
                          "'-' (up to 64), unique among the gateways of one spool")
    if d.lease_seconds < 2 * d.heartbeat_interval:
        raise ConfigError(f"{where}: daemon.lease_seconds = {d.lease_seconds:g}: must be at least twice "
                          f"daemon.heartbeat_interval ({d.heartbeat_interval:g} s), or a live node looks dead between "
                          "two heartbeats")
    seen: dict[str, int] = {}
    for i, w in enumerate(config.watch):
        if not re.fullmatch(NAME_PATTERN, w.name):
            raise ConfigError(f"{where}: watch[{i}].name = {w.name!r}: use letters, digits, '.', '_' or '-' (up to "
                              "64); the same name for this root on every gateway")
        if w.name in seen:
            raise ConfigError(f"{where}: watch[{i}].name = {w.name!r} is watch[{seen[w.name]}]'s name too (names "
                              "default to the path's last part): give each [[watch]] its own name = \"...\"")
        seen[w.name] = i
    if j.url:
        _check_journal_url(j.url, where)
    if j.password_file and not j.url:
        raise ConfigError(f"{where}: journal.password_file is set but journal.url is empty (SQLite needs no "
                          "password): set url = \"postgresql://USER@HOST/DB\" or remove password_file")


def _check_journal_url(url: str, where: str) -> None:
    """postgresql:// with a host or a socket, and no password in it (it would be printed wherever the URL is)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        start = f"it starts with {scheme!r}://" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,9}", scheme) else \
            "it has no scheme"
        raise ConfigError(f"{where}: journal.url: must start with postgresql:// ({start}); leave it empty for the "
                          "SQLite journal of one gateway")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{where}: journal.url: not a valid URL (the port must be a number from 1 to 65535): use "
                          "postgresql://USER@HOST:5432/DB") from None
    if parts.password:
        raise ConfigError(f"{where}: journal.url holds a password: remove it from the URL and put it in the file "
                          "named by journal.password_file")
    if not parts.path.strip("/"):
        raise ConfigError(f"{where}: journal.url names no database: use postgresql://USER@HOST/DB")


def _check_url(url: str, key: str, where: str, env: str = "",
               creds: str = "their own keys (username / password or password_file, client_secret)") -> None:
    """http(s) scheme, a host, a valid port, and no credentials in it (they would be printed wherever it is)."""
    also = f" (or {env})" if env else ""
    if not url.startswith(("http://", "https://")):  # as written: the other checks compare it so
        # Not the URL itself: it may hold a password before an '@' or a token in its query.
        scheme = url.split("://", 1)[0] if "://" in url else ""
        start = f"it starts with {scheme!r}://" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,9}", scheme) else \
            "it has no scheme"
        raise ConfigError(f"{where}: {key}{also}: must start with http:// or https:// ({start})")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{where}: {key}{also}: not a valid URL (the port must be a number from 1 to 65535, an "
                          "IPv6 address goes in brackets): use http://host:port/...") from None
    if parts.username or parts.password:
        raise ConfigError(f"{where}: {key}{also} holds a user name or password: remove it from the URL and set "
                          f"{creds} instead")
    if not parts.hostname:
        raise ConfigError(f"{where}: {key}{also}: no host name: use http://host:port/...")


def _validate_pacs(p: PacsConfig, where: str) -> None:
    key = f"pacs.{p.name}"
    env = pacs_env_prefix(p.name)
    if p.type not in PACS_TYPES:
        raise ConfigError(f"{where}: {key}.type = {p.type!r}: use \"orthanc\", \"dcm4chee\" or \"dicomweb\"")
    if not p.url:
        raise ConfigError(f"{where}: {key}.url is missing: set url = \"http://host:8042\" in [{key}] or {env}URL")
    _check_url(p.url, f"{key}.url", where, f"{env}URL", f"{env}USERNAME / {env}PASSWORD (or password_file)")
    if p.dicomweb_root.startswith(("http://", "https://")):
        _check_url(p.dicomweb_root, f"{key}.dicomweb_root", where)
    if p.oauth2_token_url:
        _check_url(p.oauth2_token_url, f"{key}.oauth2_token_url", where)
    for file_key, exists in (("ca_bundle", os.path.exists), ("client_cert", os.path.isfile),
                             ("client_key", os.path.isfile)):  # a CA bundle may be a hashed certificate folder
        if getattr(p, file_key) and not exists(getattr(p, file_key)):
            raise ConfigError(f"{where}: {key}.{file_key} = {getattr(p, file_key)!r}: no such file: fix the path")
    if p.fallback not in ("", "cstore"):
        raise ConfigError(f"{where}: {key}.fallback = {p.fallback!r}: use \"cstore\" or leave it empty")
    if p.fallback == "cstore" and not (p.dicom_port and p.ae_title):
        raise ConfigError(f"{where}: {key}.fallback = \"cstore\" needs dicom_port and ae_title (or {env}AE_TITLE)")
    if p.password and p.password_file:
        raise ConfigError(f"{where}: {key} has both password (in the file or {env}PASSWORD) and password_file: keep one")
    if bool(p.client_cert) != bool(p.client_key) and not _pem_holds_key(p.client_cert):
        raise ConfigError(f"{where}: {key}.client_cert and client_key go together: set both (or a PEM holding both as client_cert)")
    if p.oauth2_token_url and not p.client_id:
        raise ConfigError(f"{where}: {key}.oauth2_token_url needs client_id and client_secret (or client_secret_file)")
    for len_key in ("ae_title", "calling_ae_title"):
        if len(getattr(p, len_key)) > 16:
            raise ConfigError(f"{where}: {key}.{len_key} = {getattr(p, len_key)!r}: an AE title has at most 16 characters")


def _validate_audit(a: AuditConfig, where: str) -> None:
    if not a.syslog:
        return
    # Only now: it imports loguru and ssl, a third of a quick command's start (`history` answers in <200 ms)
    from relaypacsd.audit_syslog import syslog_target, tls_context

    try:
        scheme, _, _ = syslog_target(a.syslog)
    except ValueError as exc:
        shown = "audit.syslog" if "@" in a.syslog else f"audit.syslog = {a.syslog!r}"  # never a password
        raise ConfigError(f"{where}: {shown}: {exc}: use \"tls://audit.example.org:6514\" "
                          "(or tcp://host:514, udp://host:514)") from None
    for key, exists in (("ca_bundle", os.path.exists), ("client_cert", os.path.isfile), ("client_key", os.path.isfile)):
        if getattr(a, key) and scheme != "tls":
            raise ConfigError(f"{where}: audit.{key} is set but audit.syslog is {scheme}://: use tls:// or remove it")
        if getattr(a, key) and not exists(getattr(a, key)):
            raise ConfigError(f"{where}: audit.{key} = {getattr(a, key)!r}: no such file: fix the path")
    if bool(a.client_cert) != bool(a.client_key) and not _pem_holds_key(a.client_cert):
        raise ConfigError(f"{where}: audit.client_cert and client_key go together: set both (or a PEM holding both)")
    if scheme == "tls":
        try:  # here, not at the first connection: a reload with a broken certificate is refused, not half done
            tls_context(a.ca_bundle, a.client_cert, a.client_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"{where}: audit.ca_bundle / client_cert / client_key: unusable ({exc}): point them at "
                              "PEM files (the CA; our certificate and its key)") from None
    if not a.source_id.strip() or len(a.source_id) > 64 or not a.source_id.isprintable():
        raise ConfigError(f"{where}: audit.source_id = {a.source_id!r}: name this gateway in 1 to 64 printable "
                          "characters, e.g. \"RELAYPACS_GW\"")


def _pem_holds_key(path: str) -> bool:
    try:
        return "PRIVATE KEY" in Path(path).read_text(errors="replace")
    except OSError:
        return False


def resolve_secret(p: PacsConfig, name: str) -> Secret:
    """The secret `name` (password, token, client_secret) from the config or its *_file."""
    value: Secret = getattr(p, name)
    file_key = name + "_file"
    path = getattr(p, file_key, "")
    if value or not path:
        return value
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"pacs.{p.name}.{file_key} = {path!r}: cannot read it ({exc.strerror}): fix the path or its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"pacs.{p.name}.{file_key} = {path!r}: not text: write the {name} into it as plain text") from None
    if not secret:
        raise ConfigError(f"pacs.{p.name}.{file_key} = {path!r}: the file is empty: write the {name} into it")
    return Secret(secret)


def journal_password(journal: JournalConfig) -> Secret:
    """The PostgreSQL journal's password from journal.password_file (empty: libpq's own ways, e.g. ~/.pgpass)."""
    if not journal.password_file:
        return Secret("")
    try:
        secret = Path(journal.password_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"journal.password_file = {journal.password_file!r}: cannot read it ({exc.strerror}): fix the "
                          "path or its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"journal.password_file = {journal.password_file!r}: not text: write the password into it "
                          "as plain text") from None
    if not secret:
        raise ConfigError(f"journal.password_file = {journal.password_file!r}: the file is empty: write the database "
                          "password into it")
    return Secret(secret)


def pacs_env_prefix(name: str) -> str:
    """'ORTHANC_' for a PACS named orthanc: the prefix of its environment variables."""
    return name.upper().replace("-", "_") + "_"


def _as_table(value: Any, key: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a table ([{key}]), not {type(value).__name__}")
    return value


def _reject_unknown(table: Mapping[str, Any], allowed: set[str], prefix: str, where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}': {fix}")


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", tuple: "a list of strings"}


def _section(cls: type, table: Any, key: str, where: str) -> Any:
    table = _as_table(table, key, where)
    spec = {f.name: f for f in fields(cls)}
    _reject_unknown(table, set(spec), f"{key}.", where)
    values = {}
    for name, value in table.items():
        values[name] = _coerce(value, _field_type(cls, name), f"{key}.{name}", where)
    return cls(**values)


def _field_type(cls: type, name: str) -> type:
    from dataclasses import MISSING

    spec = {f.name: f for f in fields(cls)}[name]
    sample = spec.default_factory() if spec.default_factory is not MISSING else spec.default  # type: ignore[misc]
    return type(sample)


def _coerce(value: Any, typ: type, key: str, where: str) -> Any:
    ok = False
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
    elif typ is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif typ is Secret:
        if isinstance(value, Secret):
            return value
        ok = isinstance(value, str)
        value = Secret(value) if ok else value
    if not ok:
        shown = "(hidden)" if typ is Secret else repr(value)
        raise ConfigError(f"{where}: {key} = {shown} must be {_TYPE_WORDS.get(typ, 'a string')}: fix its value")
    return value


def _from_env(var: str, text: str, cls: type, key: str) -> Any:
    """Parse one environment variable by the type of the field it sets."""
    typ = _field_type(cls, key)
    text = text.strip()
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"environment: {var}={text!r}: use true or false" + (" (or unset it)" if not text else ""))
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"environment: {var}={text!r}: must be a whole number, e.g. {var}=3") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"environment: {var}={text!r}: must be a number of seconds, e.g. {var}=2") from None
    if typ is tuple:
        return tuple(p.strip() for p in text.split(",") if p.strip())
    if typ is Secret:
        return Secret(text)
    return text


def _replace(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)


def to_toml(config: Config, *, mask: bool = True) -> str:
    """The effective config as TOML; secrets are masked unless mask=False (used by `init` only)."""
    return tomli_w.dumps(to_dict(config, mask=mask))


def to_dict(config: Config, *, mask: bool = True) -> dict[str, Any]:
    """The effective config as plain values (the dashboard shows it); secrets masked unless mask=False."""

    def plain(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(obj):
            if f.name in skip:
                continue
            v = getattr(obj, f.name)
            if isinstance(v, Secret):
                v = (MASK if v else "") if mask else v.reveal()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    doc: dict[str, Any] = {
        "daemon": plain(config.daemon),
        "journal": plain(config.journal),
        "delivery": plain(config.delivery),
        "watch": [plain(w) for w in config.watch],
        "pacs": {name: plain(p, skip=("name",)) for name, p in config.pacs.items()},
        "audit": plain(config.audit),
    }
    if config.routes:
        doc["route"] = []
        for r in config.routes:
            table: dict[str, Any] = {"name": r.name, "to": list(r.to), "continue": r.go_on}
            if r.conditions:
                table["match"] = {c.key: c.written if isinstance(c.written, str) else list(c.written)
                                  for c in r.conditions}
            doc["route"].append(table)
    if config.web != WebConfig():  # only when set: `init` and `config show` of a setup without it stay as they were
        doc["web"] = plain(config.web)
    return doc
