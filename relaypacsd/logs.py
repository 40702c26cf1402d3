"""Logging setup: loguru to stderr (plain or JSON), an optional rotated file, stdlib logging routed in."""

from __future__ import annotations

import logging
import sys

from loguru import logger

from relaypacsd.config import DaemonConfig
from relaypacsd.errors import ConfigError

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level:<7} | {message}"


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
    # pynetdicom logs every PDU at INFO: keep it to warnings unless debugging.
    for name in ("pynetdicom", "apscheduler", "urllib3", "watchdog"):
        logging.getLogger(name).setLevel(logging.DEBUG if lvl in ("DEBUG", "TRACE") else logging.WARNING)
