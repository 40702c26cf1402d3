"""Logging setup: loguru to stderr (plain or JSON), an optional rotated file, stdlib logging routed in."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from loguru import logger

from relaypacsd.config import DaemonConfig
from relaypacsd.errors import ConfigError

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level:<7} | {message}"

# What could break a log line or fool a terminal: C0 controls, DEL, C1 controls (NEL among them), the
# Unicode line and paragraph separators, and the lone surrogates a non-UTF-8 file name decodes to.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, \\udcff): one record, one line."""
    return _UNSAFE.sub(_escape_one, text) if _UNSAFE.search(text) else text


def _escape_message(record: dict[str, Any]) -> None:
    """Patcher of every record: a file name holding a newline cannot forge a log line, in text or JSON.
    Tracebacks come from record["exception"], not the message, so they stay multi-line."""
    record["message"] = escape_controls(record["message"])


class _InterceptHandler(logging.Handler):
    """Send records of urllib3, apscheduler, pynetdicom and watchdog through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def setup_logging(cfg: DaemonConfig | None = None, *, level: str | None = None) -> None:
    """Configure sinks. diagnose stays off so tracebacks never print variable values (secrets)."""
    cfg = cfg or DaemonConfig()
    lvl = (level or cfg.log_level).upper()
    logger.remove()
    logger.configure(patcher=_escape_message)
    serialize = cfg.log_format == "json"
    logger.add(sys.stderr, level=lvl, format=TEXT_FORMAT, serialize=serialize, backtrace=False, diagnose=False,
               colorize=False, enqueue=False)
    if cfg.log_file:
        try:
            logger.add(cfg.log_file, level=lvl, format=TEXT_FORMAT, serialize=serialize, backtrace=False,
                       diagnose=False, rotation=cfg.log_rotation, retention=cfg.log_retention, enqueue=True)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"daemon.log_rotation = {cfg.log_rotation!r} / log_retention = {cfg.log_retention!r}: "
                              f"{exc}: use e.g. \"50 MB\" and \"14 days\"") from None
        except OSError as exc:
            raise ConfigError(f"daemon.log_file = {cfg.log_file!r}: cannot write it ({exc.strerror}): fix the path "
                              "or its permissions, or leave it empty (the journal of systemd or Docker keeps the log)") from None
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    debugging = lvl in ("DEBUG", "TRACE")
    # pynetdicom logs every PDU at INFO: keep it to warnings unless debugging.
    for name in ("pynetdicom", "apscheduler", "watchdog"):
        logging.getLogger(name).setLevel(logging.DEBUG if debugging else logging.WARNING)
    # urllib3 warns of each connect retry ("Retrying (Retry(total=1, ...)) after connection broken by ...");
    # our own line per event (PACS DOWN, back up, a batch not delivered) says it better.
    logging.getLogger("urllib3").setLevel(logging.DEBUG if debugging else logging.ERROR)
