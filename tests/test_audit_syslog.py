"""The syslog side of the audit trail: RFC 5424 frames, RFC 5425 octet counting, and the bounded queue that
never blocks its caller. Against a real rsyslog: tests/integration/test_audit_rsyslog.py."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator

from loguru import logger

from relaypacsd.audit_syslog import BOM, SyslogSender, frame, header_field, octet_counted

# RFC 5424 6: PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP STRUCTURED-DATA SP MSG
HEADER = re.compile(rb"<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S{1,255}) (\S{1,48}) (\S{1,128}) "
                    rb"(\S{1,32}) - ")


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """The loguru messages emitted inside the block."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{level} {message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def _closed_port() -> int:
    """A loopback TCP port where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_frame_is_rfc_5424_with_the_pri_and_msgid_of_ps3_15_a_6():
    msg = frame(b"<AuditMessage/>", hostname="gw1", app_name="relaypacsd", procid="42", when=1_790_000_000.5)
    m = HEADER.match(msg)
    assert m, msg
    assert m.groups() == (b"85", b"2026-09-21T14:13:20.500Z", b"gw1", b"relaypacsd", b"42", b"DICOM+RFC3881")
    assert msg[m.end():] == BOM + b"<AuditMessage/>"  # RFC 5424 6.4: UTF-8 MSG starts with the BOM


def test_header_fields_keep_printable_ascii_without_spaces_within_their_limits():
    assert header_field("gw 1.example\u00e9.org", 255) == "gw1.example.org"
    assert header_field("", 48) == header_field(" ", 48) == "-"  # RFC 5424 NILVALUE
    assert len(header_field("x" * 300, 255)) == 255


def test_octet_counting_prefixes_the_length_in_bytes():
    """RFC 5425 4.3: MSG-LEN SP SYSLOG-MSG, the length in octets (9 here; 8 characters)."""
    body = "<x>\u00e9</x>".encode()
    assert octet_counted(body) == b"9 " + body


def test_a_full_queue_drops_counts_and_warns_once_without_blocking():
    sender = SyslogSender(f"tcp://127.0.0.1:{_closed_port()}", queue_size=3)  # not started: nothing leaves the queue
    with captured_log() as lines:
        started = time.monotonic()
        results = [sender.submit(b"<m/>") for _ in range(10)]
        took = time.monotonic() - started
    assert results == [True] * 3 + [False] * 7
    assert sender.counters.dropped == 7 and sender.pending() == 3
    assert len([line for line in lines if "queue" in line and "full" in line]) == 1, lines
    assert took < 0.5


def test_stop_gives_up_on_an_absent_repository_and_counts_what_was_left():
    sender = SyslogSender(f"tcp://127.0.0.1:{_closed_port()}", queue_size=10)
    with captured_log() as lines:  # from the start: the sender thread may find the port closed at once
        sender.start()
        for _ in range(4):
            sender.submit(b"<m/>")
        started = time.monotonic()
        sender.stop(timeout=1.0)
        took = time.monotonic() - started
    assert took < 3
    assert sender.counters.sent == 0 and sender.counters.dropped == 4 and sender.pending() == 0
    assert any("unreachable" in line for line in lines) and any("4 audit message(s) not sent at stop" in line
                                                                  for line in lines), lines
    assert sender.submit(b"<late/>") is False  # stopped: nothing is queued any more
