"""The daemon object: start-up recovery and its hand-offs between watcher, validation and the engine."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from relaypacsd.config import build_config
from relaypacsd.errors import ConfigError, PacsUnreachable
from relaypacsd.daemon import Daemon
from relaypacsd.recovery import settle_journal
from relaypacsd.reload import longest_request
from relaypacsd.scanning import Scanner
from relaypacsd.fate import TRUNCATION_GRACE
from relaypacsd.dicomfile import inspect
from relaypacsd.journal import Update, open_journal
from relaypacsd.names import clashed, fit_name
from relaypacsd.sidecars import read_sidecar, sidecar_path, write_sidecar
from relaypacsd.spool import Spool
from tests.dicomfactory import write_instance
from tests.helpers import ScriptedPacs, count, gated, make_daemon, wait_until


def test_start_forgets_rows_of_files_a_killed_run_moved_but_did_not_record(tmp_path):
    """Killed between moving a file to sent/ and forgetting it, a run leaves "delivered" rows behind:
    the next file of that name, even the same instance sent again, must really be sent."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    sop = write_instance(tmp_path / "img.dcm")
    old = spool.sending / "img.dcm"  # what the killed run had moved on to sent/
    shutil.copy(tmp_path / "img.dcm", spool.sent / "img.dcm")
    daemon.journal.ensure(str(old), ["orthanc"], sop=sop)
    daemon.journal.apply([Update(str(old), "orthanc", "delivered", "delivered")])
    keep = spool.sending / "keep.dcm"
    shutil.copy(tmp_path / "img.dcm", keep)
    daemon.journal.ensure(str(keep), ["orthanc"], sop=sop)
    daemon.start()
    try:
        assert daemon.journal.rows(str(old)) == {}
        shutil.copy(tmp_path / "img.dcm", spool.inbox / "img.dcm")
        assert wait_until(lambda: count(spool, "sent") == 3)  # the killed run's, keep.dcm, the new img.dcm
    finally:
        daemon.shutdown(timeout=5)
    assert pacs.received(sop) == 2  # keep.dcm (its rows were kept: the file exists) and the new img.dcm


def test_start_keeps_the_rows_of_files_merely_out_of_sight(tmp_path):
    """A share not mounted yet hides sending/ and failed/: forgetting their rows would send the files
    again, once back, to the PACS that confirmed them."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    hidden = [spool.sending / "half-sent.dcm", spool.failed / "rejected.dcm"]
    for key in hidden:
        daemon.journal.ensure(str(key), ["orthanc", "other"], sop="1.2.3")
        daemon.journal.apply([Update(str(key), "other", "delivered", "delivered")])
    moved = spool.sending / "moved.dcm"  # a killed run moved it to failed/ before recording it
    (spool.failed / "moved.dcm").write_bytes(b"x")
    write_sidecar(spool.failed / "moved.dcm", {"reason": "refused", "sop_instance_uid": "1.2.4"})
    daemon.journal.ensure(str(moved), ["orthanc"], sop="1.2.4")
    daemon.start()
    daemon.shutdown(timeout=5)
    journal = open_journal(tmp_path / "state")
    try:
        assert all(journal.rows(str(key))["other"].state == "delivered" for key in hidden)
        assert journal.rows(str(moved)) == {} and journal.rows(str(spool.failed / "moved.dcm"))
    finally:
        journal.close()


def test_start_settles_rows_by_instance_not_by_name(tmp_path):
    """Modalities reuse names: an older IMG.dcm in sent/ or failed/ is not the file the killed run moved."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    older = write_instance(spool.sent / "IMG.dcm")  # delivered long ago, another instance
    ours = write_instance(spool.failed / "IMG.dcm")  # the killed run's file, refused by orthanc
    write_sidecar(spool.failed / "IMG.dcm", {"reason": "refused", "sop_instance_uid": ours})
    old_failure = spool.failed / "CT.dcm"  # an older failure, with its own rows
    old_sop = write_instance(old_failure)
    write_sidecar(old_failure, {"reason": "refused", "sop_instance_uid": old_sop})
    daemon.journal.ensure(str(old_failure), ["orthanc"], sop=old_sop)
    ours2 = write_instance(spool.failed / "CT~1.dcm")  # the killed run's, placed beside it
    write_sidecar(spool.failed / "CT~1.dcm", {"reason": "refused", "sop_instance_uid": ours2})
    reused = spool.failed / "MR.dcm"  # a failure whose name held a deleted file's rows (another instance)
    ours3 = write_instance(reused)
    write_sidecar(reused, {"reason": "refused", "sop_instance_uid": ours3})
    daemon.journal.ensure(str(reused), ["orthanc"], sop="9.9.9.deleted")
    for name, sop in (("IMG.dcm", ours), ("CT.dcm", ours2), ("MR.dcm", ours3)):
        key = str(spool.sending / name)
        daemon.journal.ensure(key, ["orthanc", "other"], sop=sop)
        daemon.journal.apply([Update(key, "other", "delivered", "delivered")])
    daemon.start()
    daemon.shutdown(timeout=5)
    journal = open_journal(tmp_path / "state")
    try:
        assert journal.rows(str(spool.failed / "IMG.dcm"))["other"].state == "delivered"  # not forgotten
        assert journal.rows(str(spool.failed / "CT~1.dcm"))["other"].state == "delivered"
        assert journal.sop_of(str(old_failure)) == old_sop and set(journal.rows(str(old_failure))) == {"orthanc"}
        assert journal.sop_of(str(reused)) == ours3 and journal.rows(str(reused))["other"].state == "delivered"
    finally:
        journal.close()
    assert older != ours


def test_a_file_of_the_same_name_claimed_while_the_last_one_was_moved_out_is_taken_at_once(tmp_path):
    """Validation skips a path the engine still tracks; the engine's hand-back must pick it up."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    write_instance(spool.sending / "img.dcm")
    path = spool.sending / "img.dcm"
    daemon.engine.submit(path, spool, inspect(path))  # tracked, not started: nothing is sent
    daemon._validate(spool, path)  # the new file under the same name: skipped as known
    assert daemon._intake.qsize() == 0
    (item,) = daemon.engine._items.values()
    daemon.engine._items.clear()
    daemon._on_finished(item, "sent")  # the old one has left; a file still stands at that path
    assert daemon._intake.qsize() == 1 and daemon.counters["sent"] == 1
    daemon.journal.close()


def test_reload_waits_for_the_request_in_flight_and_keeps_the_watchdog_fed(tmp_path, monkeypatch):
    """A new engine must never run beside an old request: it would send the same file again."""
    pacs = ScriptedPacs("orthanc")
    gate = gated(pacs)
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    pings: list[float] = []
    monkeypatch.setattr(daemon.notifier, "watchdog_interval", 0.05)
    monkeypatch.setattr(daemon.notifier, "watchdog", lambda: pings.append(time.monotonic()) or True)
    monkeypatch.setattr("relaypacsd.reload.load_config", lambda source: daemon.config)
    assert longest_request(daemon.config) == 2 * (5 + 60) + 10  # by the PACS's timeouts, not a fixed 30 s
    daemon.start()
    try:
        sop = write_instance(spool.inbox / "img.dcm")
        assert wait_until(lambda: any(d.busy for d in daemon.engine.destinations.values()))
        reloading = threading.Thread(target=daemon.reload)
        began = time.monotonic()
        reloading.start()
        time.sleep(0.5)
        assert reloading.is_alive() and [p for p in pings if p > began]  # waiting, and systemd knows it lives
        beat = json.loads((tmp_path / "state" / "heartbeat.json").read_text())
        assert beat["time"] > time.time() - 1 and beat["alive"]  # and so does `relaypacsd health`
        gate.set()
        reloading.join(10)
        assert not reloading.is_alive() and wait_until(lambda: count(spool, "sent") == 1)
    finally:
        gate.set()
        daemon.shutdown(timeout=5)
    assert pacs.received(sop) == 1


def test_a_truncated_file_with_a_future_mtime_still_fails_in_the_end(tmp_path):
    """A share whose clock runs ahead gives files a future mtime: the growing grace must still run out."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    write_instance(tmp_path / "full.dcm")
    path = spool.sending / "img.dcm"
    path.write_bytes((tmp_path / "full.dcm").read_bytes()[:-100])
    future = time.time() + 3600
    os.utime(path, (future, future))
    daemon._validate(spool, path)
    assert path.exists() and path in daemon._growing  # may still grow: waits
    daemon._growing[path] -= 60  # a minute of sweeps later, still cut off
    daemon._validate(spool, path)
    assert not path.exists() and (spool.failed / "img.dcm").exists() and sidecar_path(spool.failed / "img.dcm").exists()
    daemon.journal.close()


def test_a_file_that_cannot_be_claimed_does_not_hold_up_the_others(tmp_path, monkeypatch):
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    real_claim = Spool.claim

    def claim(self, path, **kwargs):
        if path.name == "a-locked.dcm":
            raise PermissionError(13, "Permission denied", str(path))
        return real_claim(self, path, **kwargs)

    monkeypatch.setattr(Spool, "claim", claim)
    for name in ("a-locked.dcm", "b.dcm", "c.dcm"):  # found by the first scan: one claim group, the bad first
        write_instance(spool.inbox / name)
    daemon.start()
    try:
        assert wait_until(lambda: count(spool, "sent") == 2, timeout=10)
    finally:
        daemon.shutdown(timeout=5)
    assert [p.name for p in spool.files("inbox")] == ["a-locked.dcm"]


def test_shutdown_lets_the_request_in_flight_finish(tmp_path):
    """SIGTERM: nothing new is claimed, but a batch already sent gets its answer recorded and its move."""
    pacs = ScriptedPacs("orthanc")
    gate = gated(pacs)
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    daemon.start()
    try:
        sop = write_instance(spool.inbox / "img.dcm")
        assert wait_until(lambda: any(d.busy for d in daemon.engine.destinations.values()))
        threading.Timer(0.5, gate.set).start()  # the PACS answers while the daemon is stopping
    finally:
        daemon.shutdown(timeout=10)
        gate.set()
    assert count(spool, "sent") == 1 and count(spool, "sending") == 0 and pacs.received(sop) == 1


def test_an_unusable_state_dir_is_a_config_error_naming_the_key(tmp_path):
    (tmp_path / "afile").write_text("x")
    config = build_config({"daemon": {"state_dir": str(tmp_path / "afile" / "state")},
                           "watch": [{"path": str(tmp_path / "root")}], "delivery": {"enabled": False}}, {})
    with pytest.raises(ConfigError, match="daemon.state_dir.*writable"):
        Daemon(config, senders={})


def test_a_metrics_port_in_use_is_a_config_error_naming_the_key(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state"), "metrics_port": taken.getsockname()[1]},
                           "watch": [{"path": str(tmp_path / "root")}], "delivery": {"enabled": False}}, {})
    daemon = Daemon(config, senders={})
    try:
        with pytest.raises(ConfigError, match="daemon.metrics_port.*pick another port"):
            daemon._start_metrics()
    finally:
        taken.close()
        daemon.journal.close()


def test_bad_log_rotation_stops_run_with_one_line_naming_the_key(tmp_path):
    """Through the real command: loguru's own error would otherwise be a traceback and exit 1."""
    conf = tmp_path / "relaypacs.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nlog_file = "{tmp_path / "relay.log"}"\n'
                    f'log_rotation = "banana"\n[delivery]\nenabled = false\n[[watch]]\npath = "{tmp_path / "root"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORTHANC_", "DCM4CHEE_", "PACS_", "ACTIVE_PACS"))}
    result = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(conf), "run"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2 and "daemon.log_rotation" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_a_hanging_watch_root_does_not_stop_the_others(tmp_path, monkeypatch):
    """A hard-mounted NFS share that hangs blocks its scan; the local roots must go on forwarding."""
    pacs = ScriptedPacs("orthanc")
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           "watch": [{"path": str(tmp_path / "share"), "settle_seconds": 0.1},
                                     {"path": str(tmp_path / "local"), "settle_seconds": 0.1}],
                           "delivery": {"retry_delay": 0.01}, "pacs": {"orthanc": {"url": pacs.target}}}, {})
    daemon = Daemon(config, senders={"orthanc": pacs})
    hung = threading.Event()
    monkeypatch.setattr(daemon.watchers[0], "tick", lambda *a, **k: hung.wait(30) and [])
    daemon.start()
    try:
        sop = write_instance(daemon.spools[1].inbox / "img.dcm")
        assert wait_until(lambda: count(daemon.spools[1], "sent") == 1, timeout=10)
    finally:
        hung.set()
        daemon.shutdown(timeout=5)
    assert pacs.received(sop) == 1


def test_a_probe_hanging_on_a_pacs_holds_up_neither_start_nor_stop(tmp_path):
    """A PACS that takes connections and never answers keeps a probe for its whole timeout (65 s by
    default): longer than systemd's watchdog allows a reload, and than a stop should take."""
    pacs = ScriptedPacs("orthanc")
    hang, probing, probed = threading.Event(), threading.Event(), threading.Event()

    def hanging_probe():
        probing.set()
        hang.wait(30)
        probed.set()
        raise PacsUnreachable("PACS 'orthanc' unreachable: connection reset")

    pacs.probe = hanging_probe
    daemon = make_daemon(tmp_path, pacs)
    try:
        started = time.monotonic()
        daemon.start()
        assert probing.wait(5) and time.monotonic() - started < 5  # started while the probe still hangs
        started = time.monotonic()
        daemon.shutdown(timeout=5)
        assert time.monotonic() - started < 15
    finally:
        hang.set()
    assert probed.wait(5)
    time.sleep(0.2)
    assert daemon.engine.destinations["orthanc"].healthy  # what the late probe found is not recorded


def test_a_reload_is_not_held_up_by_a_scanner_stuck_on_a_hung_share(tmp_path, monkeypatch):
    """Only a validation (an unpack) gets the long wait; the other threads of the old generation get 5 s."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    hung = threading.Event()
    monkeypatch.setattr(daemon.watchers[0], "tick", lambda *a, **k: hung.wait(60) and [])
    monkeypatch.setattr("relaypacsd.reload.load_config", lambda source: daemon.config)
    daemon.start()
    try:
        reloading = threading.Thread(target=daemon.reload)
        reloading.start()
        reloading.join(30)
        assert not reloading.is_alive()
    finally:
        hung.set()
        daemon.shutdown(timeout=5)


def test_a_scanner_that_outlives_a_reload_claims_nothing_after_it(tmp_path, monkeypatch):
    """Back from a tick that hung past the reload's wait, the old scanner must end, not claim with the
    old settings beside the new generation."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    hung, entered = threading.Event(), threading.Event()
    late = spool.inbox / "late.dcm"

    def hanging_tick(*args, **kwargs):
        entered.set()
        hung.wait(60)
        return [late]  # what it found settled, by its old rules

    monkeypatch.setattr(daemon.watchers[0], "tick", hanging_tick)
    monkeypatch.setattr("relaypacsd.reload.load_config", lambda source: daemon.config)
    claims: list[threading.Thread] = []
    real_claim = Scanner.claim
    monkeypatch.setattr(Scanner, "claim", lambda s, p: claims.append(threading.current_thread()) or real_claim(s, p))
    daemon.start()
    try:
        assert entered.wait(5)
        old_scanner = next(t for t in threading.enumerate() if t.name == "scanner-0")
        daemon.reload()  # its 5 s wait for the hung scanner runs out
        write_instance(late)
        hung.set()
        old_scanner.join(5)
        assert not old_scanner.is_alive() and old_scanner not in claims
    finally:
        hung.set()
        daemon.shutdown(timeout=5)


def test_a_zero_tail_waits_the_grace_then_fails_with_the_fix_never_goes_as_it_is(tmp_path):
    """Zeros after the data set: a preallocating writer still filling the file, or padding. A writer paused
    past the grace looks the same as padding, so such a file is never forwarded as it is: failed/, with
    the exact command that strips padding."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    write_instance(tmp_path / "full.dcm")
    data = (tmp_path / "full.dcm").read_bytes()
    path = spool.sending / "padded.dcm"
    path.write_bytes(data + bytes(4096))
    daemon._validate(spool, path)
    assert path in daemon._growing and not daemon.engine.known(path)  # written just now: it may still fill
    daemon._growing[path] -= 3600  # an hour of sweeps later, unchanged (the grace counts from our first look)
    daemon._validate(spool, path)
    assert not daemon.engine.known(path) and count(spool, "failed") == 1
    sidecar = read_sidecar(spool.failed / "padded.dcm")
    assert f"truncate -s {len(data)} FILE" in sidecar["next_step"] and "zeros" in sidecar["reason"]
    daemon.journal.close()


def test_a_truncated_file_from_a_share_whose_clock_is_behind_gets_the_grace_then_goes(tmp_path):
    """A share's clock an hour behind ours gives a file being written an mtime an hour old: it must still get
    the truncation grace, counted from our first look, and go once complete. One that never grows fails."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    daemon.engine.start()
    try:
        sop = write_instance(tmp_path / "full.dcm")
        data = (tmp_path / "full.dcm").read_bytes()
        behind = time.time() - 3600

        def write(path, body):
            path.write_bytes(body)
            os.utime(path, (behind, behind))  # what the writer's clock says

        growing, stuck = spool.sending / "img.dcm", spool.sending / "stuck.dcm"
        write(growing, data[:-2000])
        daemon._validate(spool, growing)
        assert growing.exists() and count(spool, "failed") == 0  # half a file: waits
        daemon._growing[growing] -= TRUNCATION_GRACE - 1  # most of the grace later, it grew:
        write(growing, data[:-100])
        daemon._validate(spool, growing)
        daemon._growing[growing] -= TRUNCATION_GRACE - 1  # the grace started again
        daemon._validate(spool, growing)
        assert growing.exists() and count(spool, "failed") == 0
        write(growing, data)  # complete now
        daemon._validate(spool, growing)
        assert wait_until(lambda: count(spool, "sent") == 1) and pacs.received(sop) == 1

        write(stuck, data[:-100])
        daemon._validate(spool, stuck)
        assert stuck.exists()
        daemon._growing[stuck] -= TRUNCATION_GRACE + 1  # unchanged for the whole grace
        daemon._validate(spool, stuck)
        assert not stuck.exists() and sidecar_path(spool.failed / "stuck.dcm").exists()
        assert count(spool, "failed") == 1 and not daemon._growing and not daemon._grown
    finally:
        daemon.engine.stop(timeout=5)
        daemon.journal.close()


def test_retention_counts_from_the_arrival_in_sent_not_from_a_copied_mtime(tmp_path, monkeypatch):
    """`cp -p` / `rsync -a` keep a file's mtime of 30 days ago: retention must count from its arrival in sent/."""
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           "watch": [{"path": str(tmp_path / "root")}],
                           "delivery": {"enabled": False, "sent_retention_days": 7}}, {})
    daemon = Daemon(config, senders={})
    spool = daemon.spools[0]
    spool.prepare()
    copy = tmp_path / "img.dcm"
    write_instance(copy)
    month_ago = time.time() - 30 * 86400
    os.utime(copy, (month_ago, month_ago))
    os.rename(copy, spool.inbox / "img.dcm")  # moved in, as a copy tool finishes
    sent = spool.finish(spool.claim(spool.inbox / "img.dcm"), "sent")
    daemon._retention_job()
    assert sent.exists()  # sent seconds ago
    later = time.time() + 8 * 86400
    monkeypatch.setattr(time, "time", lambda: later)  # eight days on
    daemon._retention_job()
    assert not sent.exists()
    daemon.journal.close()


class _SteppableClock:
    """The wall clock of this process, steppable: time.time() and the datetime.now() apscheduler and the
    daemon read (monotonic time is left alone, as a real step leaves it)."""

    def __init__(self, monkeypatch):
        self.offset = 0.0
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + self.offset)

        class SteppedDatetime(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.datetime.fromtimestamp(time.time(), tz)

        for module in ("apscheduler.schedulers.base", "apscheduler.executors.base", "apscheduler.triggers.interval",
                       "relaypacsd.jobs"):
            monkeypatch.setattr(f"{module}.datetime", SteppedDatetime)


def test_after_the_clock_steps_back_the_jobs_go_on_and_a_pacs_that_returns_is_marked_up(tmp_path, monkeypatch):
    """apscheduler plans interval jobs by the wall clock: stepped back an hour, the probe, the sweep and the
    heartbeat would wait that hour and a PACS marked DOWN stay DOWN. The main loop sees the step and runs them."""
    clock = _SteppableClock(monkeypatch)
    pacs = ScriptedPacs("orthanc")
    pacs.probe_error = PacsUnreachable("PACS 'orthanc' unreachable: connection refused")
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state"), "heartbeat_interval": 1.0},
                           "watch": [{"path": str(tmp_path / "root"), "rescan_interval": 3600}],
                           "delivery": {"health_interval": 1.0, "retry_sweep_interval": 1.0},
                           "pacs": {"orthanc": {"url": pacs.target}}}, {})
    daemon = Daemon(config, senders={"orthanc": pacs})
    dest = daemon.engine.destinations["orthanc"]
    beat = daemon.state_dir / "heartbeat.json"
    daemon.start()
    loop = threading.Thread(target=daemon._main_loop, name="main-loop", daemon=True)
    loop.start()
    try:
        assert wait_until(lambda: not dest.healthy, timeout=10)  # the first probe finds it down
        clock.offset = -3600.0  # NTP steps the clock back an hour
        time.sleep(0.2)
        written = beat.stat().st_mtime_ns  # the kernel's clock: not stepped here
        pacs.probe_error = None  # the PACS is back
        assert wait_until(lambda: dest.healthy, timeout=10)
        assert wait_until(lambda: beat.stat().st_mtime_ns > written, timeout=5)  # the heartbeat goes on
    finally:
        daemon.request_stop()
        loop.join(10)
        daemon.shutdown(timeout=5)


def test_an_idle_daemon_does_not_wake_its_threads(tmp_path):
    """Idle, the workers, validators and scanners block until there is work: waits with a timeout woke each
    twice a second (the scanner five times) and were most of an idle daemon's CPU. Counts, not CPU %, so a
    loaded machine cannot make it pass or fail."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    calls = {"worker": 0, "validator": 0, "scanner": 0}

    def counted(kind, wait):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return wait(*args, **kwargs)
        return wrapper

    for dest in daemon.engine.destinations.values():
        dest.cond.wait = counted("worker", dest.cond.wait)
    daemon._intake.get = counted("validator", daemon._intake.get)
    for watcher in daemon.watchers:
        watcher.tick = counted("scanner", watcher.tick)
    daemon.start()
    try:
        time.sleep(0.5)  # start-up: the first scan, the first probe
        before = dict(calls)
        time.sleep(2.0)
        woke = {kind: calls[kind] - before[kind] for kind in calls}
        assert woke == {"worker": 0, "validator": 0, "scanner": 0}
        sop = write_instance(daemon.spools[0].inbox / "img.dcm")  # and work still wakes them at once
        assert wait_until(lambda: count(daemon.spools[0], "sent") == 1, timeout=10) and pacs.received(sop) == 1
    finally:
        daemon.shutdown(timeout=5)
    assert not any(t.is_alive() for t in daemon._threads)  # the stop woke them too


def _killed_run_failed(daemon, spool, rel, failed_at):
    """What a run killed between a file's move to failed/ and its journal update leaves: the file and its
    sidecar at `failed_at`, its rows (one PACS confirmed it) still under sending/`rel`."""
    sop = write_instance(failed_at)
    write_sidecar(failed_at, {"reason": "refused", "sop_instance_uid": sop})
    key = str(spool.sending / rel)
    daemon.journal.ensure(key, ["orthanc", "other"], sop=sop)
    daemon.journal.apply([Update(key, "other", "delivered", "delivered")])
    return key


def test_start_follows_rows_to_a_failed_file_whose_name_was_cut(tmp_path):
    """A name over NAME_MAX less the sidecar suffix is cut on its way to failed/ (its ~N clash names too):
    the settling at start-up must still find it, or a retry sends it again to the PACS that confirmed it."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    name = "a" * 246 + ".dcm"  # fits in sending/, its sidecar would not in failed/
    cut = spool.failed / fit_name("a" * 246, ".dcm")
    key = _killed_run_failed(daemon, spool, name, cut)
    other = "b" * 246 + ".dcm"  # and one that clashed there too: b...~1.dcm, cut further
    write_instance(spool.failed / fit_name("b" * 246, ".dcm"))
    clash = clashed(spool.failed / fit_name("b" * 246, ".dcm"), 1)
    key2 = _killed_run_failed(daemon, spool, other, clash)
    settle_journal(daemon.journal, spool)
    try:
        assert daemon.journal.rows(key) == {} and daemon.journal.rows(str(cut))["other"].state == "delivered"
        assert daemon.journal.rows(key2) == {} and daemon.journal.rows(str(clash))["other"].state == "delivered"
    finally:
        daemon.journal.close()


def test_start_follows_rows_to_a_failed_file_whose_folder_got_a_free_name(tmp_path):
    """failed/CT1 is a file, so a killed run moved sending/CT1/IM0001.dcm to failed/CT1~1/IM0001.dcm."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    (spool.failed / "CT1").write_bytes(b"an old failure")
    moved = spool.failed / "CT1~1" / "IM0001.dcm"
    key = _killed_run_failed(daemon, spool, "CT1/IM0001.dcm", moved)
    settle_journal(daemon.journal, spool)
    try:
        assert daemon.journal.rows(key) == {} and daemon.journal.rows(str(moved))["other"].state == "delivered"
    finally:
        daemon.journal.close()


def test_a_stop_that_comes_as_an_idle_scanner_starts_its_look_ends_it_at_once(tmp_path):
    """_stop_pieces sets the stop, then wakes the scanner (`arrived`); landing between the scanner's look at
    the stop and its clear of `arrived`, the wake was lost and the idle scanner slept until the next rescan
    (an hour here): the stop waited for it, and the old generation's scanner outlived a reload."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool, watcher = daemon.spools[0], daemon.watchers[0]
    spool.prepare()
    stop = threading.Event()

    class Racing(threading.Event):
        def clear(self):
            if not stop.is_set():  # the scanner has just seen no stop: _stop_pieces runs now
                stop.set()
                self.set()
            super().clear()

    watcher.arrived = Racing()
    scanner = threading.Thread(target=Scanner(spool, watcher, stop, daemon._queue_intake, daemon._may_be_empty).run,
                               daemon=True)
    scanner.start()
    scanner.join(3)
    try:
        assert not scanner.is_alive()
    finally:
        watcher.arrived.set()
        daemon.journal.close()


def test_a_folder_emptied_just_before_the_clock_steps_forward_is_kept(tmp_path, monkeypatch):
    """Emptied folders go once untouched for 60 s, judged by their mtime (wall time): stepped forward an hour,
    a folder a claim emptied a second ago looked an hour old, and the sweep the step runs at once removed it
    under a writer pausing between the files of its study."""
    clock = _SteppableClock(monkeypatch)
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    study = spool.inbox / "study"
    study.mkdir()  # a claim has just emptied it; the writer's next file comes in a moment
    daemon._may_be_empty(spool, study)
    clock.offset += 3600.0  # NTP steps the clock forward an hour
    try:
        daemon.folders.prune()
        assert study.is_dir()
    finally:
        daemon.journal.close()
