"""Operator commands without a PACS: help, input checks, status/retry on a spool, init, delivery helpers."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from relaypacsd import cli
from relaypacsd.commands.common import UsageError, check_uid, human_age
from relaypacsd.commands.send import batches
from relaypacsd.delivery import deliver_parts
from relaypacsd.errors import DestinationProblem, PacsError, PacsUnreachable
from relaypacsd.journal import open_journal
from relaypacsd.models import Part
from relaypacsd.outcomes import InstanceResult, Outcome
from relaypacsd.senders import FallbackSender, stow_unusable
from relaypacsd.sidecars import write_sidecar
from relaypacsd.spool import Spool
from tests.commands.helpers import clean_env, write_config
from tests.helpers import refuse_sidecar_removal

COMMANDS = ["status", "retry", "send", "query", "retrieve", "verify", "check", "init", "history"]


@pytest.fixture(autouse=True)
def _no_operator_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith(("ORTHANC_", "DCM4CHEE_", "ACTIVE_PACS", "PACS_", "RELAYPACS_CONFIG")):
            monkeypatch.delenv(k)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"relaypacsd {command}" in capsys.readouterr().out


def test_help_subprocess():
    res = subprocess.run([sys.executable, "-m", "relaypacsd", "verify", "--help"], capture_output=True, text=True,
                         env=clean_env(), timeout=60)
    assert res.returncode == 0 and "STUDY_UID|PATH" in res.stdout


def test_check_uid():
    assert check_uid("1.2.840.10008.1.1") == "1.2.840.10008.1.1"
    for bad in ("1.2.x", "1..2", "1.02.3", "../etc", "1." + "1" * 70):
        with pytest.raises(UsageError):
            check_uid(bad)


def test_human_age():
    assert human_age(5) == "5s" and human_age(125) == "2m05s" and human_age(7300) == "2h01m" and human_age(90000) == "1d01h"


def test_status_and_retry(tmp_path, capsys):
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    (spool.inbox / "new.dcm").write_bytes(b"x")
    bad = spool.failed / "sub" / "bad.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"y")
    write_sidecar(bad, {"reason": "PACS refused it"})
    journal = open_journal(tmp_path / "state")
    journal.ensure(str(bad), ["orthanc", "other"], first_seen=1.0)
    journal.set_health("orthanc", False, "PACS 'orthanc' unreachable")
    journal.update(str(bad), "orthanc", state="failed", event="failed", detail="permanent: nope")
    journal.update(str(bad), "other", state="delivered", event="delivered")
    journal.close()

    assert cli.main(["-c", str(conf), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    root = doc["watch"][0]
    assert (root["inbox"], root["sending"], root["failed"]) == (1, 0, 1)
    assert doc["pacs"][0]["health"] == "DOWN" and "unreachable" in doc["pacs"][0]["last_error"]
    assert doc["daemon"]["running"] is False
    assert cli.main(["-c", str(conf), "status"]) == 0
    assert "oldest waiting" in capsys.readouterr().out

    assert cli.main(["-c", str(conf), "retry", str(bad)]) == 0
    assert "queued sub/bad.dcm" in capsys.readouterr().out
    new = spool.sending / "sub" / "bad.dcm"
    assert new.exists() and not bad.exists() and not Path(str(bad) + ".error.json").exists()
    journal = open_journal(tmp_path / "state")
    rows = journal.rows(str(new))
    assert rows["orthanc"].state == "pending" and rows["orthanc"].attempts == 0
    assert rows["other"].state == "delivered"  # a PACS that confirmed it never gets it again
    assert rows["orthanc"].first_seen > 1.0
    journal.close()
    assert cli.main(["-c", str(conf), "retry", "--all"]) == 0
    assert "nothing to retry" in capsys.readouterr().out


def test_status_health_unknown_until_this_run_knows_and_counters_from_the_first_delivery(tmp_path, capsys):
    """Item 10: the counters of a row never written by a health change were lost (delivered 0, last success
    never), and an earlier run's DOWN stayed on show; a delivery is evidence of health."""
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    path = str(tmp_path / "spool" / "sending" / "a.dcm")
    journal = open_journal(tmp_path / "state")
    journal.set_health("orthanc", False, "PACS 'orthanc' unreachable")  # an earlier run's outage

    def status() -> dict:
        assert cli.main(["-c", str(conf), "status", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["pacs"][0]

    journal.begin_run(["orthanc"])  # a new run starts
    first = status()
    assert first["health"] == "unknown" and first["health_current"] is False and first["delivered"] == 0
    journal.ensure(path, ["orthanc"])
    journal.update(path, "orthanc", state="delivered", event="delivered")
    after = status()
    assert after["health"] == "up" and after["delivered"] == 1 and after["last_success"] is not None
    assert "unreachable" in after["last_error"]  # the last error is history, kept
    journal.set_health("orthanc", False, "PACS 'orthanc' unreachable again")
    journal.update(path, "orthanc", state="delivered", event="delivered")  # a batch in flight as it went down
    down = status()
    assert down["health"] == "DOWN" and down["delivered"] == 2  # the probe's DOWN stands
    assert journal.destinations()["orthanc"]["healthy"] is False
    journal.begin_run(["orthanc"])
    assert journal.destinations()["orthanc"]["healthy"] is None and journal.destinations()["orthanc"]["delivered"] == 2
    journal.update(path, "orthanc", state="failed", event="failed")
    assert status()["failed"] == 1 and status()["health"] == "unknown"  # a rejected file says nothing of health
    journal.close()
    assert cli.main(["-c", str(conf), "status"]) == 0
    assert "unknown" in capsys.readouterr().out


def test_status_says_a_stopped_daemons_finding_is_not_current(tmp_path, capsys):
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    journal = open_journal(tmp_path / "state")
    journal.set_health("orthanc", False, "PACS 'orthanc' unreachable")
    journal.close()
    assert cli.main(["-c", str(conf), "status"]) == 0
    assert "DOWN (when the daemon last ran)" in capsys.readouterr().out


def test_retry_refuses_files_outside_failed(tmp_path, capsys):
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    f = tmp_path / "elsewhere.dcm"
    f.write_bytes(b"x")
    assert cli.main(["-c", str(conf), "retry", str(f)]) == 1
    assert "not inside a failed/ folder" in capsys.readouterr().err


def test_init_writes_starter_config_from_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ORTHANC_URL", "http://127.0.0.1:8042")
    monkeypatch.setenv("ORTHANC_USERNAME", "relay")
    monkeypatch.setenv("ORTHANC_PASSWORD", "s3cret")
    target = tmp_path / "etc" / "relaypacs.toml"
    assert cli.main(["-c", str(target), "init", "--watch", str(tmp_path / "w"), "--state-dir", str(tmp_path / "st")]) == 0
    text = target.read_text()
    assert "s3cret" not in text
    doc = tomllib.loads(text)
    assert doc["pacs"]["orthanc"]["url"] == "http://127.0.0.1:8042"
    assert doc["pacs"]["orthanc"]["username"] == "relay"
    assert doc["watch"][0]["path"] == str(tmp_path / "w")
    assert oct(target.stat().st_mode & 0o777) == "0o640"
    assert cli.main(["-c", str(target), "init"]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli.main(["-c", str(target), "config", "show"]) == 0
    assert "********" in capsys.readouterr().out


class FakeSender:
    name, target = "fake", "fake://"

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls: list[list[str]] = []

    def send(self, parts):
        self.calls.append([p.sop_uid for p in parts])
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [InstanceResult(p.sop_uid, answer(p.sop_uid, len(parts)), 200, None, "x") for p in parts], 200

    def probe(self):
        pass


def _parts(n):
    return [Part(Path(f"/x/{i}"), f"1.{i}", 1) for i in range(n)]


def test_deliver_parts_retries_and_splits():
    split_then_ok = [lambda uid, n: Outcome.SPLIT if n > 1 else Outcome.DELIVERED] * 7
    sender = FakeSender(split_then_ok)
    final = deliver_parts(sender, _parts(4), attempts=3, delay=0, sleep=lambda s: None)
    assert all(r.outcome is Outcome.DELIVERED for r in final.values()) and len(final) == 4
    assert sender.calls[0] == ["1.0", "1.1", "1.2", "1.3"] and len(sender.calls) == 7
    sender = FakeSender([lambda u, n: Outcome.TRANSIENT, lambda u, n: Outcome.TRANSIENT, lambda u, n: Outcome.DELIVERED])
    final = deliver_parts(sender, _parts(2), attempts=3, delay=0, sleep=lambda s: None)
    assert len(sender.calls) == 3 and all(r.outcome.delivered for r in final.values())
    sender = FakeSender([DestinationProblem("401", status=401)])
    final = deliver_parts(sender, _parts(2), attempts=3, delay=0, sleep=lambda s: None)
    assert len(sender.calls) == 1 and all(r.outcome is Outcome.DESTINATION for r in final.values())


def test_fallback_rules():
    assert stow_unusable(PacsUnreachable("connection refused", sent=False))
    assert not stow_unusable(PacsUnreachable("no answer within 60 s (read_timeout)", sent=True))
    assert stow_unusable(DestinationProblem("x", status=404))
    assert stow_unusable(DestinationProblem("x", status=415))
    assert not stow_unusable(DestinationProblem("x", status=401))
    assert not stow_unusable(PacsError("500", status=500))

    fb = FallbackSender.__new__(FallbackSender)
    fb.name, fb.last_path = "p", ""
    fb.stow = FakeSender([lambda u, n: Outcome.PERMANENT])
    fb.cstore = FakeSender([])
    results, _ = fb.send(_parts(1))
    assert results[0].outcome is Outcome.PERMANENT and fb.cstore.calls == []  # never for per-instance rejections
    fb.stow = FakeSender([DestinationProblem("405", status=405)])
    fb.cstore = FakeSender([lambda u, n: Outcome.DELIVERED])
    fb.cstore.target = "dicom://x"
    results, _ = fb.send(_parts(2))
    assert fb.cstore.calls and fb.last_path == "C-STORE"


def test_batches_group_by_study():
    from relaypacsd.dicomfile import DicomInfo

    def info(study, n, size=10):  # one SOP Instance UID per file, as send gives them (id(object()) repeats)
        return DicomInfo("1.2", f"{study}.{n}", study, "1.3", "1.2.840.10008.1.2.1", size)
    items = [(Path(f"/f{i}"), info("1.1" if i % 2 else "1.2", i)) for i in range(7)]
    out = batches(items, 2, 10**6)
    assert all(len({i.study_instance_uid for _, i in b}) == 1 and len(b) <= 2 for b in out)
    assert sum(len(b) for b in out) == 7


def test_retry_moves_the_journal_rows_ahead_of_the_file(tmp_path, capsys, monkeypatch):
    """A running daemon may validate the file the moment it is back in sending/: it must find the PACS
    that confirmed it already marked delivered, or it sends the file there again."""
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    bad = spool.failed / "bad.dcm"
    bad.write_bytes(b"y")
    write_sidecar(bad, {"reason": "refused by orthanc"})
    journal = open_journal(tmp_path / "state")
    journal.ensure(str(bad), ["orthanc", "other"])
    journal.update(str(bad), "orthanc", state="failed", event="failed", detail="permanent: nope")
    journal.update(str(bad), "other", state="delivered", event="delivered")
    journal.close()
    seen_by_daemon = {}
    real_move = Spool.move_to

    def move_and_validate_at_once(self, src, dest):
        real_move(self, src, dest)
        daemon_journal = open_journal(tmp_path / "state")  # the daemon's own connection
        seen_by_daemon.update({d: r.state for d, r in daemon_journal.ensure(str(dest), ["orthanc", "other"]).items()})
        daemon_journal.close()

    monkeypatch.setattr(Spool, "move_to", move_and_validate_at_once)
    assert cli.main(["-c", str(conf), "retry", str(bad)]) == 0
    assert seen_by_daemon == {"orthanc": "pending", "other": "delivered"}
    journal = open_journal(tmp_path / "state")
    assert {d: r.state for d, r in journal.rows(str(spool.sending / "bad.dcm")).items()} == seen_by_daemon
    assert journal.rows(str(bad)) == {}
    journal.close()


SECRET = "S3cretPW-9f2"
BROKEN = {  # name -> (relaypacs.toml text, environment, words the one line must hold)
    "negative heartbeat": ('[daemon]\nheartbeat_interval = -5\n', {}, "daemon.heartbeat_interval"),
    "nan heartbeat": ('[daemon]\nheartbeat_interval = nan\n', {}, "finite"),
    "infinite retry delay": ("", {"PACS_RETRY_DELAY": "inf"}, "PACS_RETRY_DELAY"),
    "huge worker count": ('[delivery]\nworkers_per_pacs = 100000000\n', {}, "workers_per_pacs"),
    "url without scheme, with a password": ("", {"ORTHANC_URL": f"relaypacs:{SECRET}@pacs:8042"}, "http://"),
    "password in dicomweb_root": (f'[pacs.orthanc]\nurl = "http://pacs:8042"\n'
                                  f'dicomweb_root = "http://u:{SECRET}@pacs/dicom-web"\n', {}, "dicomweb_root"),
    "password in the token url": (f'[pacs.orthanc]\nurl = "http://pacs:8042"\nclient_id = "relay"\n'
                                  f'oauth2_token_url = "https://svc:{SECRET}@idp/token"\n', {}, "oauth2_token_url"),
    "port not a number": ("", {"ORTHANC_URL": "http://pacs:80a42"}, "port"),
    "empty PACS_ENABLED": ("", {"PACS_ENABLED": ""}, "PACS_ENABLED"),
    "missing ca_bundle": ('[pacs.orthanc]\nurl = "https://pacs"\nca_bundle = "/nonexistent/ca.pem"\n', {}, "ca_bundle"),
    "dicom port out of range": ('[pacs.orthanc]\nurl = "http://pacs"\ndicom_port = 70000\n', {}, "dicom_port"),
    "negative retention": ('[delivery]\nsent_retention_days = -1\n', {}, "sent_retention_days"),
    "ACTIVE_PACS in upper case": ('[pacs.orthanc]\nurl = "http://pacs"\n', {"ACTIVE_PACS": "Orthanc"},
                                  "did you mean 'orthanc'"),
    "password in env and password_file": ('[pacs.orthanc]\nurl = "http://pacs"\npassword_file = "/run/pw"\n',
                                          {"ORTHANC_PASSWORD": SECRET}, "ORTHANC_PASSWORD"),
    "relative state_dir": ('[daemon]\nstate_dir = "state"\n', {}, "absolute path"),
    "broken IPv6 bracket in the token url": ('[pacs.orthanc]\nurl = "http://pacs"\nclient_id = "relay"\n'
                                             'oauth2_token_url = "https://[::1/token"\n', {}, "not a valid URL"),
    "token in the query of a bad url": ("", {"ORTHANC_URL": f"http://pacs:80a42/?token={SECRET}"}, "port"),
    "scheme typo, token in the query": ("", {"ORTHANC_URL": f"htps://pacs/x?access_token={SECRET}"},
                                        "starts with 'htps'"),
    "no scheme, a later '://' after the password": ("", {"ORTHANC_URL": f"http:/a:{SECRET}@pacs/?r=https://x"},
                                                    "no scheme"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_config_is_one_line_exit_2_no_traceback_no_secret(tmp_path, capsys, monkeypatch, name):
    text, env, words = BROKEN[name]
    conf = tmp_path / "relaypacs.toml"
    conf.write_text(f'[[watch]]\npath = "{tmp_path / "spool"}"\n' + text)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert cli.main(["-c", str(conf), "config", "show"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("relaypacsd: error:") and words in err, err
    assert "Traceback" not in err and SECRET not in err


def test_valid_unusual_settings_are_still_accepted(tmp_path):
    from relaypacsd.config import build_config

    certs = tmp_path / "certs"
    certs.mkdir()  # a hashed CA folder (c_rehash) is a valid ca_bundle for requests
    config = build_config({"watch": [{"path": str(tmp_path)}], "pacs": {"orthanc": {
        "url": "http://[::1]:8042", "dicomweb_root": "/pacs@site/rs", "ca_bundle": str(certs)}}}, {})
    assert config.pacs["orthanc"].stow_base == "http://[::1]:8042/pacs@site/rs"


def test_a_relative_watch_path_is_refused_with_its_absolute_form(tmp_path, capsys):
    conf = tmp_path / "relaypacs.toml"
    conf.write_text('[[watch]]\npath = "spool/ct"\n')
    assert cli.main(["-c", str(conf), "config", "show"]) == 2
    err = capsys.readouterr().err
    assert "watch[0].path" in err and "absolute" in err and os.path.abspath("spool/ct") in err


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    conf = tmp_path / "relaypacs.toml"
    conf.write_bytes(f'# Configuraci\xf3n\n[[watch]]\npath = "{tmp_path}"\n'.encode("latin-1"))
    assert cli.main(["-c", str(conf), "config", "show"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_an_empty_password_file_is_refused(tmp_path):
    from relaypacsd.config import ConfigError, PacsConfig, resolve_secret

    empty = tmp_path / "pw"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="password_file.*empty"):
        resolve_secret(PacsConfig(name="orthanc", url="http://pacs", password_file=str(empty)), "password")


def test_config_may_follow_the_command_as_the_docs_write_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "--config", str(tmp_path / "etc" / "relaypacs.toml"), "--watch", str(tmp_path)]) == 0
    assert (tmp_path / "etc" / "relaypacs.toml").exists()
    assert cli.main(["config", "show", "-c", str(tmp_path / "etc" / "relaypacs.toml")]) == 0


def test_init_into_a_place_it_cannot_write_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["init", "--config", str(tmp_path / "file" / "relaypacs.toml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "file" in err


def test_an_unknown_log_level_on_the_command_line_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--log-level", "verbose"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_status_does_not_call_a_stopped_daemon_running(tmp_path, capsys):
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    (tmp_path / "state").mkdir()
    beat = {"time": time.time(), "pid": os.getpid(), "host": socket.gethostname(), "stopped": True}
    (tmp_path / "state" / "heartbeat.json").write_text(json.dumps(beat))
    assert cli.main(["-c", str(conf), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["daemon"]["running"] is False


def test_check_does_not_create_a_missing_watch_root_and_fails_without_one(tmp_path, capsys):
    """An unmounted share must not pass as a fresh local folder; no [[watch]] means the daemon won't start."""
    conf = tmp_path / "relaypacs.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[watch]]\npath = "{tmp_path / "share"}"\n')
    assert cli.main(["-c", str(conf), "check"]) == 0
    out = capsys.readouterr().out
    assert "does not exist" in out and "mount it first" in out and not (tmp_path / "share").exists()
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    assert cli.main(["-c", str(conf), "check"]) == 1
    assert "FAIL watch roots" in capsys.readouterr().out


def test_a_client_secret_over_plain_http_is_warned_about():
    from relaypacsd.config import PacsConfig
    from relaypacsd.http import security_warnings

    pacs = PacsConfig(name="orthanc", url="https://pacs", oauth2_token_url="http://idp.example/token", client_id="x")
    assert any("client secret" in w and "http://idp.example/token" in w for w in security_warnings(pacs))
    local = PacsConfig(name="orthanc", url="https://pacs", oauth2_token_url="http://127.0.0.1:9/token", client_id="x")
    assert not any("client secret" in w for w in security_warnings(local))


def test_when_stow_and_cstore_are_both_unreachable_the_error_says_both(tmp_path):
    """Rebuilding the C-STORE error with the STOW one used to raise TypeError (a worker's "unexpected error")."""
    from relaypacsd.config import PacsConfig
    from relaypacsd.senders import FallbackSender

    pacs = PacsConfig(name="orthanc", type="orthanc", url="http://127.0.0.1:1", ae_title="ORTHANC",
                      dicom_host="127.0.0.1", dicom_port=1, fallback="cstore", connect_timeout=1.0)
    sender = FallbackSender(pacs)
    write_instance_path = tmp_path / "a.dcm"
    from tests.dicomfactory import write_instance

    sop = write_instance(write_instance_path)
    with pytest.raises(PacsUnreachable) as err:
        sender.send([Part(write_instance_path, sop, write_instance_path.stat().st_size)])
    assert "DICOM port unreachable" in str(err.value) and "STOW-RS also failed" in str(err.value)
    with pytest.raises(PacsUnreachable, match="and STOW-RS"):
        sender.probe()


def test_the_command_line_does_not_load_pydicom_for_health():
    """`health` runs every few seconds (Docker HEALTHCHECK): it must stay light."""
    code = "import sys, relaypacsd.cli; print('pydicom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "False"


def test_check_reads_a_hashed_ca_folder_as_a_folder(tmp_path, monkeypatch):
    """requests takes a c_rehash folder as ca_bundle; check's own TLS test must too, not fail 'unreachable'."""
    import ssl

    from relaypacsd.commands import check
    from relaypacsd.config import PacsConfig

    seen = {}

    class Refusing:
        verify_mode = check_hostname = None

        def wrap_socket(self, *args, **kwargs):
            raise ssl.SSLError("handshake refused (test)")

    def context(cafile=None, capath=None):
        seen.update(cafile=cafile, capath=capath)
        return Refusing()

    monkeypatch.setattr(check.ssl, "create_default_context", context)
    c = check.Checker()
    check._check_tls(PacsConfig(name="orthanc", url="https://pacs", ca_bundle=str(tmp_path)), None, "pacs", c)
    assert seen == {"cafile": None, "capath": str(tmp_path)}


def _failed_file_confirmed_by_other(tmp_path, name="bad.dcm"):
    """A failed file that PACS 'other' confirmed and 'orthanc' refused, with its journal rows."""
    from tests.dicomfactory import write_instance

    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    bad = spool.failed / name
    sop = write_instance(bad)
    write_sidecar(bad, {"reason": "refused by orthanc", "sop_instance_uid": sop})
    journal = open_journal(tmp_path / "state")
    journal.ensure(str(bad), ["orthanc", "other"], sop=sop)
    journal.update(str(bad), "orthanc", state="failed", event="failed", detail="permanent: nope")
    journal.update(str(bad), "other", state="delivered", event="delivered")
    journal.close()
    return conf, spool, bad, sop


def _states(tmp_path, path):
    journal = open_journal(tmp_path / "state")
    try:
        return {d: r.state for d, r in journal.rows(str(path)).items()}
    finally:
        journal.close()


def test_retry_when_the_name_is_taken_keeps_rows_and_file_together(tmp_path, capsys, monkeypatch):
    """sending/bad.dcm is taken: rows and file must both go to bad~1.dcm, and be there together at the
    moment the file lands (a running daemon may take it at once; a kill may come right after)."""
    conf, spool, bad, _ = _failed_file_confirmed_by_other(tmp_path)
    (spool.sending / "bad.dcm").write_bytes(b"another file waiting there")
    real_move = Spool.move_to

    def move_then_killed(self, src, dest):
        real_move(self, src, dest)
        raise KeyboardInterrupt  # the process ends here: nothing after the move runs

    monkeypatch.setattr(Spool, "move_to", move_then_killed)
    cli.main(["-c", str(conf), "retry", str(bad)])
    assert (spool.sending / "bad~1.dcm").exists()
    assert _states(tmp_path, spool.sending / "bad~1.dcm") == {"orthanc": "pending", "other": "delivered"}


def test_a_retry_killed_between_rows_and_file_leaves_the_file_its_rows(tmp_path, capsys, monkeypatch):
    """Killed after the rows were copied ahead and before the file moved: the file in failed/ keeps its
    rows, whatever becomes of the copy (a running daemon claiming a new file of that name drops it), and
    the next retry carries them along (else the file would go again to 'other', which has it)."""
    from relaypacsd.journal import open_journal as J

    conf, spool, bad, _ = _failed_file_confirmed_by_other(tmp_path)
    (spool.sending / "bad.dcm").write_bytes(b"another file waiting there")
    monkeypatch.setattr(Spool, "move_to", lambda self, src, dest: (_ for _ in ()).throw(KeyboardInterrupt))
    cli.main(["-c", str(conf), "retry", str(bad)])
    monkeypatch.undo()
    assert bad.exists() and _states(tmp_path, bad) == {"orthanc": "pending", "other": "delivered"}
    journal = J(tmp_path / "state")  # the daemon claims a new bad~1.dcm, another instance
    journal.ensure(str(spool.sending / "bad~1.dcm"), ["orthanc", "other"], sop="1.2.3.another")
    journal.close()
    capsys.readouterr()
    assert cli.main(["-c", str(conf), "retry", str(bad)]) == 0
    (new,) = [p for p in spool.files("sending") if p.name != "bad.dcm"]
    assert _states(tmp_path, new) == {"orthanc": "pending", "other": "delivered"} and not bad.exists()
    assert _states(tmp_path, bad) == {}


def test_a_name_taken_between_the_look_and_the_move_gets_its_own_copy_first(tmp_path, capsys, monkeypatch):
    """The daemon claims a new bad.dcm just before the move: the file lands on another name, which must
    hold its rows the moment it lands (the daemon may take it then, or a kill may come)."""
    conf, spool, bad, _ = _failed_file_confirmed_by_other(tmp_path)
    real_move = Spool.move_to
    landed = {}

    def raced(self, src, dest):
        if dest.name == "bad.dcm":
            dest.write_bytes(b"claimed by the daemon a moment ago")
        real_move(self, src, dest)
        landed[dest.name] = _states(tmp_path, dest)  # what a daemon taking it now would find
        raise KeyboardInterrupt  # and killed right there

    monkeypatch.setattr(Spool, "move_to", raced)
    cli.main(["-c", str(conf), "retry", str(bad)])
    assert landed == {"bad~1.dcm": {"orthanc": "pending", "other": "delivered"}}
    assert _states(tmp_path, spool.sending / "bad.dcm") == {}  # the other file's name holds no copy of ours


def test_a_sidecar_that_cannot_be_removed_does_not_cost_the_file_its_rows(tmp_path, capsys, monkeypatch):
    conf, spool, bad, _ = _failed_file_confirmed_by_other(tmp_path)
    refuse_sidecar_removal(monkeypatch)
    assert cli.main(["-c", str(conf), "retry", str(bad)]) == 0
    assert "could not remove" in capsys.readouterr().out
    assert _states(tmp_path, spool.sending / "bad.dcm") == {"orthanc": "pending", "other": "delivered"}


def test_start_up_drops_a_copy_a_killed_retry_left_ahead(tmp_path, monkeypatch):
    from relaypacsd.config import load_config
    from relaypacsd.daemon import Daemon
    from relaypacsd.recovery import settle_journal

    conf, spool, bad, _ = _failed_file_confirmed_by_other(tmp_path)
    monkeypatch.setattr(Spool, "move_to", lambda self, src, dest: (_ for _ in ()).throw(KeyboardInterrupt))
    cli.main(["-c", str(conf), "retry", str(bad)])
    monkeypatch.undo()
    assert _states(tmp_path, spool.sending / "bad.dcm")  # the copy, with no file
    daemon = Daemon(load_config(conf), senders={})
    settle_journal(daemon.journal, spool)
    daemon.journal.close()
    assert _states(tmp_path, spool.sending / "bad.dcm") == {}
    assert _states(tmp_path, bad) == {"orthanc": "pending", "other": "delivered"}


def _claimed_by_the_daemon_then_taken(tmp_path, monkeypatch, daemon_writes):
    """Spool.move_to as a daemon claiming sending/bad.dcm just before the retry's move: the daemon's file
    lands there, `daemon_writes(journal, path)` runs on the daemon's own connection, then the move fails."""
    real_move = Spool.move_to

    def raced(self, src, dest):
        if dest.name == "bad.dcm":
            dest.write_bytes(b"the daemon's own file")
            journal = open_journal(tmp_path / "state")
            try:
                daemon_writes(journal, str(dest))
            finally:
                journal.close()
            raise FileExistsError(17, "File exists", str(dest))
        real_move(self, src, dest)

    monkeypatch.setattr(Spool, "move_to", raced)


def test_a_retry_racing_a_claim_leaves_the_daemons_fresh_rows_alone(tmp_path, capsys, monkeypatch):
    """The retry's cleanup after FileExistsError deleted every row at the name, the daemon's too: its file then
    had no 'failed' row, and a rejected file was moved to sent/."""
    conf, spool, bad, sop = _failed_file_confirmed_by_other(tmp_path)

    def daemon_writes(journal, path):
        journal.ensure(path, ["orthanc", "other"], sop="1.2.3.the.daemons.file")
        journal.update(path, "orthanc", state="failed", event="failed", detail="permanent: refused")

    _claimed_by_the_daemon_then_taken(tmp_path, monkeypatch, daemon_writes)
    assert cli.main(["-c", str(conf), "retry", str(bad)]) == 0
    assert _states(tmp_path, spool.sending / "bad.dcm") == {"orthanc": "failed", "other": "pending"}
    assert _states(tmp_path, spool.sending / "bad~1.dcm") == {"orthanc": "pending", "other": "delivered"}


def test_a_retry_racing_a_claim_of_the_same_instance_leaves_the_rows_it_adopted(tmp_path, capsys, monkeypatch):
    """The daemon's file is the same instance: it adopts the copied rows (ensure keeps them) and records its
    answer in them; the retry must not take those back."""
    conf, spool, bad, sop = _failed_file_confirmed_by_other(tmp_path)

    def daemon_writes(journal, path):
        journal.ensure(path, ["orthanc", "other"], sop=sop)
        journal.update(path, "orthanc", state="failed", event="failed", detail="permanent: refused")

    _claimed_by_the_daemon_then_taken(tmp_path, monkeypatch, daemon_writes)
    assert cli.main(["-c", str(conf), "retry", str(bad)]) == 0
    assert _states(tmp_path, spool.sending / "bad.dcm") == {"orthanc": "failed", "other": "delivered"}


def test_a_retry_racing_the_daemons_claim_never_makes_a_rejected_file_sent(tmp_path, capsys, monkeypatch):
    """The whole race, the real engine in the window between the PACS's answer and the file's move."""
    from relaypacsd.config import load_config
    from relaypacsd.delivery import Engine
    from relaypacsd.dicomfile import inspect
    from tests.dicomfactory import write_instance

    conf, spool, bad, sop = _failed_file_confirmed_by_other(tmp_path)

    class Refusing:
        name, target = "orthanc", "http://orthanc.test"

        def send(self, parts):
            return [InstanceResult(p.sop_uid, Outcome.PERMANENT, 400, None, "refused") for p in parts], 400

    class Taking(Refusing):
        name = "other"

        def send(self, parts):
            return [InstanceResult(p.sop_uid, Outcome.DELIVERED, 200, None, "stored") for p in parts], 200

    config = load_config(conf)
    config.pacs["other"] = dataclasses.replace(config.pacs["orthanc"], name="other")
    journal = open_journal(tmp_path / "state")
    engine = Engine(config, journal, {"orthanc": Refusing(), "other": Taking()})
    held = []
    engine._hand_over = held.extend  # the finishing thread has not moved it yet
    real_move = Spool.move_to

    def raced(self, src, dest):
        if dest.name == "bad.dcm":  # the daemon claims a new bad.dcm from inbox/ and delivers it
            write_instance(spool.inbox / "bad.dcm")
            claimed = spool.claim(spool.inbox / "bad.dcm")
            engine.submit(claimed, spool, inspect(claimed))
            for name in ("orthanc", "other"):
                d = engine.destinations[name]
                engine._deliver(d, d.take_batch(engine.stop_event))
            raise FileExistsError(17, "File exists", str(dest))
        real_move(self, src, dest)

    monkeypatch.setattr(Spool, "move_to", raced)
    assert cli.main(["-c", str(conf), "retry", str(bad)]) == 0
    engine._finish(held)
    journal.close()
    assert not (spool.sent / "bad.dcm").exists() and (spool.failed / "bad.dcm").exists()
    assert (spool.sending / "bad~1.dcm").exists()


def test_status_counts_uid_conflicts_per_pacs(tmp_path, capsys):
    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    Spool(tmp_path / "spool").prepare()
    journal = open_journal(tmp_path / "state")
    journal.set_health("orthanc", True)
    journal.ensure("/x/sending/b.dcm", ["orthanc"], sop="1.2.3")
    journal.update("/x/sending/b.dcm", "orthanc", state="failed", event="uid_conflict", detail="uid_conflict: x")
    journal.close()
    assert cli.main(["-c", str(conf), "status", "--json"]) == 0
    (pacs,) = json.loads(capsys.readouterr().out)["pacs"]
    assert pacs["uid_conflicts"] == 1 and pacs["failed"] == 1
    assert cli.main(["-c", str(conf), "status"]) == 0
    assert "UID conflicts" in capsys.readouterr().out


def test_status_reads_a_journal_no_daemon_has_upgraded_yet(tmp_path, capsys):
    import sqlite3

    from tests.helpers import OLD_SCHEMA

    conf = write_config(tmp_path, url="http://127.0.0.1:9")
    Spool(tmp_path / "spool").prepare()
    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO destinations (dest, healthy, last_change, delivered) VALUES ('orthanc', 1, 1, 3)")
    db.commit()
    db.close()
    assert cli.main(["-c", str(conf), "status", "--json"]) == 0
    (pacs,) = json.loads(capsys.readouterr().out)["pacs"]
    assert pacs["uid_conflicts"] == 0 and pacs["delivered"] == 3
