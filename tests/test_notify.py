"""relaypacsd.notify against real AF_UNIX datagram sockets (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from relaypacsd.notify import Notifier


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_messages_reach_a_path_socket(listener):
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("2 watch root(s);\n5 in flight")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 watch root(s); 5 in flight"
    for call, expected in ((n.watchdog, b"WATCHDOG=1"), (n.stopping, b"STOPPING=1"), (n.reloading, b"RELOADING=1"),
                           (lambda: n.status("ok"), b"STATUS=ok")):
        assert call()
        assert sock.recv(4096).split(b"\n")[0] == expected
    n.reloading()
    assert sock.recv(4096).split(b"\n")[1].startswith(b"MONOTONIC_USEC=")
    n.close()


def test_abstract_namespace_socket():
    name = f"relaypacsd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_no_op_without_notify_socket():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval == 0
    assert n.ready() is False and n.stopping() is False


def test_a_vanished_socket_is_one_warning_not_a_crash(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.send("WATCHDOG=1") is False
    assert n.send("WATCHDOG=1") is False


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    # The watchdog is meant for another process: never ping it.
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval == 0
    assert Notifier({"WATCHDOG_USEC": "nonsense"}).watchdog_interval == 0
