"""The dashboard's server in a real daemon: config refusals in one line, a port in use, HTTPS with Secure cookies."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import sys
import threading
import urllib.request

import pytest

from relaypacsd.config import build_config
from relaypacsd.errors import ConfigError
from relaypacsd.localorthanc import free_port
from relaypacsd.tally import Tally
from relaypacsd.web.server import WebServer
from tests.helpers import ScriptedPacs, make_daemon
from tests.web.conftest import PASSWORDS

WATCH = {"watch": [{"path": "/tmp/x"}]}


@pytest.mark.parametrize("address", ["0.0.0.0", "10.1.2.3", "::", "gateway.example"])
def test_a_network_address_without_users_is_refused_in_one_line(address):
    with pytest.raises(ConfigError) as exc:
        build_config({**WATCH, "web": {"port": 8080, "address": address}}, {})
    message = str(exc.value)
    assert "web.address" in message and "users_file" in message and "\n" not in message


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_loopback_without_users_is_the_read_only_mode(address):
    assert build_config({**WATCH, "web": {"port": 8080, "address": address}}, {}).web.address == address


def test_tls_needs_both_files_and_an_unknown_web_key_is_named():
    with pytest.raises(ConfigError, match="tls_cert and web.tls_key go together"):
        build_config({**WATCH, "web": {"port": 8080, "tls_key": "/etc/hosts"}}, {})
    with pytest.raises(ConfigError, match="unknown key 'web.prot'"):
        build_config({**WATCH, "web": {"prot": 8080}}, {})


def _daemon(tmp_path, **web):
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    daemon.tally = Tally()
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")}, "watch": [{"path": str(tmp_path / "root")}],
                           "web": {"port": free_port(), **web}}, {})
    return daemon, config.web


def test_a_port_in_use_is_a_config_error_naming_the_key(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        daemon, web = _daemon(tmp_path)
        web = type(web)(address="127.0.0.1", port=busy.getsockname()[1])
        with pytest.raises(ConfigError, match=r"web.port = \d+ on 127.0.0.1: cannot listen there"):
            WebServer(daemon, web).start()
    daemon.journal.close()


def test_a_missing_users_file_stops_the_start_with_its_fix(tmp_path):
    daemon, web = _daemon(tmp_path, users_file=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="relaypacsd user add"):
        WebServer(daemon, web).start()
    daemon.journal.close()


def test_https_serves_the_dashboard_and_its_session_cookie_is_secure(tmp_path, users_file):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    daemon, web = _daemon(tmp_path, tls_cert=str(cert), tls_key=str(key), users_file=str(users_file))
    server = WebServer(daemon, web)
    daemon.start()
    server.start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        assert json.load(urllib.request.urlopen(server.url + "healthz", context=ctx)) == {"status": "ok"}
        conn = http.client.HTTPSConnection("127.0.0.1", web.port, context=ctx, timeout=10)
        conn.request("GET", "/login")
        r = conn.getresponse()
        page, cookie = r.read().decode(), r.getheader("set-cookie")
        assert "Secure" in cookie
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        form = f"name=olga&password={PASSWORDS['olga']}&csrf={token}"
        conn.request("POST", "/login", body=form, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                          "Cookie": cookie.split(";")[0]})
        r = conn.getresponse()
        r.read()
        assert r.status == 303 and "Secure" in r.getheader("set-cookie") and "HttpOnly" in r.getheader("set-cookie")
        conn.close()
    finally:
        server.stop()
        daemon.shutdown()
        daemon.tally.join()
    assert not [t for t in threading.enumerate() if t.name == "web"]


def test_the_daemon_refuses_to_run_with_a_dashboard_open_to_the_network(tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\n[web]\naddress = "0.0.0.0"\nport = 8080\n'
                   f'[[watch]]\npath = "{tmp_path}/root"\n')
    res = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "run"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "web.address" in res.stderr, res.stderr
