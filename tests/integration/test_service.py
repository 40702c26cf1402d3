"""Run as a service, tested on the real `relaypacsd run` process: signals, SIGHUP reload, systemd notify,
health, metrics and logs."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from relaypacsd.localorthanc import free_port
from tests.dicomfactory import write_instance, write_study
from tests.integration.daemon_helpers import (assert_no_secrets, count_in, daemon_env, daemon_log, files_in,
                                              log_files, start_daemon, stop_daemon, wait_for, wait_ready,
                                              write_config)


def health(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "health"], capture_output=True,
                          text=True, env=daemon_env(), timeout=30)


def test_sigterm_with_files_in_flight_loses_nothing_and_restart_finishes(tmp_path, clean_orthanc):
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path, clean_orthanc, delivery={"batch_max_instances": 1, "workers_per_pacs": 1})
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        _, uids = write_study(spool / "inbox" / "study", 80)
        wait_for(lambda: files_in(spool, "sent"), 30, interval=0.02, message=lambda: daemon_log(proc)[-2000:])
        started = time.monotonic()
        code = stop_daemon(proc, timeout=30)
        took = time.monotonic() - started
    finally:
        stop_daemon(proc, timeout=5, sig=signal.SIGKILL)
    assert code == 0, daemon_log(proc)
    assert took < 15, f"graceful stop took {took:.1f} s"
    assert "relaypacsd stopped" in daemon_log(proc)
    sent, waiting = count_in(spool, "sent"), count_in(spool, "inbox", "sending")
    assert count_in(spool, "failed") == 0
    assert sent + waiting == 80, "a file got lost on SIGTERM"
    assert waiting > 0, "every file was already sent: the test did not stop the daemon mid-flight"

    proc = start_daemon(cfg)
    try:
        wait_for(lambda: count_in(spool, "sent") == 80, 60, message=lambda: daemon_log(proc)[-2000:])
    finally:
        assert stop_daemon(proc) == 0
    assert count_in(spool, "inbox", "sending", "failed") == 0
    assert set(uids) <= clean_orthanc.list_instance_uids()
    assert_no_secrets(log_files(tmp_path), [clean_orthanc.password])


def test_sighup_reloads_credentials_and_watch_roots_and_refuses_a_broken_config(tmp_path, orthanc_factory):
    right, wrong = "reload-right-Pw-7f3a9", "reload-wrong-Pw-c41e2"
    pacs = orthanc_factory(password=right)
    spool, spool2 = tmp_path / "spool", tmp_path / "spool2"
    cfg = write_config(tmp_path, pacs, pacs={"password": wrong})
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        _, uids = write_study(spool / "inbox", 5)
        # Wrong password: the PACS is marked down, the files wait in sending/.
        wait_for(lambda: count_in(spool, "sending") == 5 and "DOWN" in daemon_log(proc), 20,
                 message=lambda: daemon_log(proc)[-2000:])
        time.sleep(1)
        assert count_in(spool, "sent", "failed") == 0

        # Good config: right password and a second watch root. SIGHUP applies it without losing a file.
        watch2 = {"path": str(spool2), "settle_seconds": 0.3, "poll_interval": 0.3, "rescan_interval": 1.0}
        write_config(tmp_path, pacs, watch=[
            {"path": str(spool), "settle_seconds": 0.3, "poll_interval": 0.3, "rescan_interval": 1.0}, watch2])
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: count_in(spool, "sent") == 5, 30, message=lambda: daemon_log(proc)[-3000:])
        # The new workers may deliver before start() returns and logs "done": wait for the line.
        wait_for(lambda: re.search(r"reload of \S+ done", daemon_log(proc)), 10, message=lambda: daemon_log(proc)[-2000:])
        uid2 = write_instance(spool2 / "inbox" / "second-root.dcm")
        wait_for(lambda: count_in(spool2, "sent") == 1, 20, message=lambda: daemon_log(proc)[-2000:])

        # Broken config: one log line, the old config keeps forwarding.
        cfg.write_text("[daemon\nstate_dir = ")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "refused, still running" in daemon_log(proc), 10, message=lambda: daemon_log(proc)[-2000:])
        refused = [line for line in daemon_log(proc).splitlines() if "refused, still running" in line]
        assert len(refused) == 1 and "not valid TOML" in refused[0], refused
        uid3 = write_instance(spool / "inbox" / "after-broken.dcm")
        wait_for(lambda: count_in(spool, "sent") == 6, 20, message=lambda: daemon_log(proc)[-2000:])
        assert proc.poll() is None
    finally:
        code = stop_daemon(proc)
    assert code == 0, daemon_log(proc)
    assert set(uids) | {uid2, uid3} <= pacs.list_instance_uids()
    assert count_in(spool, "failed", "sending", "inbox") == 0
    assert_no_secrets(log_files(tmp_path), [right, wrong])


def _receive(sock: socket.socket, messages: list[str], until: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
        if any(until in m.split("\n") for m in messages):
            return
    raise AssertionError(f"no {until} within {timeout} s; got {messages}")


def test_systemd_notify_ready_status_watchdog_reload_stopping(tmp_path, clean_orthanc):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    cfg = write_config(tmp_path, clean_orthanc)
    proc = start_daemon(cfg, {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    messages: list[str] = []
    try:
        _receive(sock, messages, "READY=1", 20)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=1 watch root(s)" in ready and "PACS: orthanc up" in ready
        _receive(sock, messages, "WATCHDOG=1", 5)
        n = len(messages)
        proc.send_signal(signal.SIGHUP)
        _receive(sock, messages, "RELOADING=1", 10)
        after = messages[n:]
        del messages[:]
        _receive(sock, messages, "READY=1", 20)
        assert any("MONOTONIC_USEC=" in m for m in after)
        proc.send_signal(signal.SIGTERM)
        _receive(sock, messages, "STOPPING=1", 20)
        assert proc.wait(30) == 0
    finally:
        stop_daemon(proc)
        sock.close()


def test_health_of_the_real_daemon(tmp_path, clean_orthanc):
    cfg = write_config(tmp_path, clean_orthanc)
    result = health(cfg)
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: no heartbeat")
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        result = health(cfg)
        assert result.returncode == 0 and result.stdout.startswith("healthy:"), result.stdout + result.stderr
        proc.kill()  # a crash: no chance to write anything
        proc.wait()
        result = health(cfg)
        assert result.returncode == 1
        assert result.stdout.startswith("unhealthy: relaypacsd (pid") and "not running" in result.stdout
        assert len(result.stdout.strip().splitlines()) == 1

        # A stale heartbeat (a hung daemon, or one in another PID namespace): its age decides.
        beat_path = tmp_path / "state" / "heartbeat.json"
        beat = json.loads(beat_path.read_text())
        beat.update(time=time.time() - 120, host="elsewhere")
        beat_path.write_text(json.dumps(beat))
        result = health(cfg)
        age = re.search(r"last heartbeat (\d+) s ago", result.stdout)  # 120 s plus this command's start-up
        assert result.returncode == 1 and age and 120 <= int(age[1]) < 150, result.stdout

        # A graceful stop says so.
        proc = start_daemon(cfg)
        wait_ready(proc)
        assert health(cfg).returncode == 0
        assert stop_daemon(proc) == 0
        result = health(cfg)
        assert result.returncode == 1 and "stopped at" in result.stdout, result.stdout
    finally:
        stop_daemon(proc)


def test_metrics_endpoint_of_the_real_daemon(tmp_path, clean_orthanc):
    spool = tmp_path / "spool"
    port = free_port()
    cfg = write_config(tmp_path, clean_orthanc, daemon={"metrics_port": port, "metrics_address": "127.0.0.1"})
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        write_study(spool / "inbox", 6)
        (spool / "inbox" / "junk.dcm").write_bytes(b"not dicom at all" * 10)
        wait_for(lambda: count_in(spool, "sent") == 6 and count_in(spool, "failed") == 1, 30,
                 message=lambda: daemon_log(proc)[-2000:])
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        assert stop_daemon(proc) == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    root = str(spool)
    assert samples[("relaypacsd_files", (("folder", "sent"), ("root", root)))] == 6
    assert samples[("relaypacsd_files", (("folder", "failed"), ("root", root)))] == 1
    assert samples[("relaypacsd_files", (("folder", "inbox"), ("root", root)))] == 0
    assert samples[("relaypacsd_oldest_waiting_seconds", (("root", root),))] == 0
    assert samples[("relaypacsd_destination_up", (("pacs", "orthanc"),))] == 1
    assert samples[("relaypacsd_delivered_total", (("pacs", "orthanc"),))] == 6
    assert samples[("relaypacsd_files_settled_total", (("folder", "sent"),))] == 6
    assert samples[("relaypacsd_files_settled_total", (("folder", "failed"),))] == 1
    assert samples[("relaypacsd_delivery_seconds_count", (("pacs", "orthanc"),))] >= 1
    assert samples[("relaypacsd_alive", ())] == 1
    with pytest.raises(requests.ConnectionError):  # the endpoint closes with the daemon
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_json_logs_with_file_sink_and_no_password_anywhere(tmp_path, orthanc_factory):
    password = "json-log-Secret-93bd1"
    pacs = orthanc_factory(password=password)
    spool = tmp_path / "spool"
    # DEBUG prints the effective config; a wrong password makes the PACS answer 401: both near the secret.
    cfg = write_config(tmp_path, pacs, daemon={"log_format": "json", "log_level": "DEBUG"},
                       pacs={"password": password + "-wrong"})
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        write_instance(spool / "inbox" / "a.dcm")
        wait_for(lambda: "DOWN" in daemon_log(proc), 20, message=lambda: daemon_log(proc)[-2000:])
        write_config(tmp_path, pacs, daemon={"log_format": "json", "log_level": "DEBUG"})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: count_in(spool, "sent") == 1, 30, message=lambda: daemon_log(proc)[-2000:])
    finally:
        assert stop_daemon(proc) == 0
    lines = [line for line in daemon_log(proc).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(r["record"]["level"]["name"] == "DEBUG" for r in records)
    assert any("relaypacsd ready" in r["text"] for r in records)
    sink = tmp_path / "logs" / "relaypacsd.log"
    sink_lines = sink.read_text().splitlines()
    assert sink_lines and all(json.loads(line)["text"] for line in sink_lines)
    assert_no_secrets(log_files(tmp_path), [password, password + "-wrong"])
