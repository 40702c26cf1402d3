"""Logging setup: control characters escaped in every record (text and JSON), urllib3 kept quiet.

The daemon tests run the real `relaypacsd run` with its PACS on a closed loopback port (no Orthanc needed).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from loguru import logger

from relaypacsd.config import DaemonConfig
from relaypacsd.localorthanc import free_port
from relaypacsd.logs import escape_controls, setup_logging
from tests.integration.daemon_helpers import (daemon_log, start_daemon, stop_daemon, wait_for, wait_ready,
                                              write_config)

FORGED = "INFO    | PACS forward orthanc delivered: 999 file(s)"


@pytest.fixture
def restore_logging():
    yield
    logger.remove()
    logger.configure(patcher=lambda record: None)
    logger.add(lambda m: None)  # pytest's own capture is not loguru's; leave a harmless sink
    logging.basicConfig(handlers=[], force=True)


def test_escape_controls():
    assert escape_controls("plain name.dcm") == "plain name.dcm"
    assert escape_controls("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape_controls("\x1b[31mred\x00\x7f\x85") == "\\x1b[31mred\\x00\\x7f\\x85"
    assert escape_controls("x\u2028y") == "x\\u2028y"
    assert escape_controls("caf\udce9.dcm") == "caf\\udce9.dcm"  # a Latin-1 name decoded with surrogateescape
    assert escape_controls("Müller é 中.dcm") == "Müller é 中.dcm"  # printable non-ASCII stays


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_record_can_forge_a_line_but_tracebacks_stay(tmp_path: Path, fmt: str, restore_logging) -> None:
    log = tmp_path / "r.log"
    setup_logging(DaemonConfig(log_file=str(log), log_format=fmt))
    logger.info("claimed {}", f"x\n{FORGED}\rESC\x1b[2J caf\udce9.dcm")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("a bug while handling {}", "y\nz")
    logger.complete()
    text = log.read_text()
    lines = text.splitlines()
    assert not any(line.startswith(FORGED.split("|")[0].strip()) for line in lines)
    if fmt == "text":
        assert "x\\nINFO    | PACS forward" in lines[0] and "\\x1b[2J" in lines[0] and "caf\\udce9" in lines[0]
        assert "Traceback" in text and len(lines) > 3  # the traceback keeps its lines
    else:
        records = [json.loads(line) for line in lines]
        assert "\n" not in records[0]["record"]["message"] and "\\n" in records[0]["record"]["message"]
        assert "Traceback" in records[1]["text"] and "\n" in records[1]["text"]


def test_urllib3_retry_warnings_stay_out_unless_debugging(restore_logging, capsys) -> None:
    setup_logging(DaemonConfig())
    logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=1)) after connection broken")
    logging.getLogger("urllib3.connectionpool").error("a real urllib3 error")
    err = capsys.readouterr().err
    assert "Retrying" not in err and "a real urllib3 error" in err
    setup_logging(DaemonConfig(), level="DEBUG")
    logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=1)) after connection broken")
    assert "Retrying" in capsys.readouterr().err


def _closed_port_config(tmp_path: Path, fmt: str = "text") -> Path:
    port = free_port()  # nothing listens there: every connect is refused
    return write_config(tmp_path, daemon={"log_format": fmt},
                        pacs_tables={"orthanc": {"type": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web",
                                                 "connect_timeout": 1.0, "read_timeout": 2.0}})


def test_the_daemon_logs_no_urllib3_line_while_the_pacs_is_unreachable(tmp_path: Path) -> None:
    cfg = _closed_port_config(tmp_path)
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        wait_for(lambda: "is DOWN" in daemon_log(proc), 20, message=lambda: daemon_log(proc)[-2000:])
        time.sleep(2.5)  # a few more probes (health_interval 1 s), each with urllib3's connect retries
    finally:
        assert stop_daemon(proc) == 0
    for text in (daemon_log(proc), (tmp_path / "logs" / "relaypacsd.log").read_text()):
        assert "is DOWN" in text
        assert "urllib3" not in text and "Retrying (Retry(" not in text, text[-3000:]
