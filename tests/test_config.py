"""Config: file + environment, validation messages, masking."""

import subprocess
import sys

import pytest

from relaypacsd.config import ConfigError, Secret, build_config, load_config, to_toml

WATCH = {"watch": [{"path": "/srv/relaypacs/ct"}]}


def test_only_orthanc_url_in_environment_and_one_watch_root(tmp_path):
    cfg = tmp_path / "relaypacs.toml"
    cfg.write_text('[[watch]]\npath = "/srv/relaypacs/ct"\n')
    config = load_config(cfg, {"ORTHANC_URL": "http://127.0.0.1:8042"})
    assert [p.name for p in config.active()] == ["orthanc"]
    assert config.pacs["orthanc"].type == "orthanc"
    assert config.pacs["orthanc"].stow_base == "http://127.0.0.1:8042/dicom-web"
    assert config.delivery.retry_attempts == 3 and config.delivery.retry_delay == 2.0


def test_seed_environment_variables_override_the_file():
    raw = {**WATCH, "pacs": {"orthanc": {"url": "http://file:8042", "username": "file"}},
           "delivery": {"retry_attempts": 9}}
    env = {"ORTHANC_URL": "http://env:8042", "ORTHANC_USERNAME": "envuser", "ORTHANC_PASSWORD": "pw",
           "ORTHANC_AE_TITLE": "ORTH", "DCM4CHEE_URL": "http://dcm:8080", "DCM4CHEE_AE_TITLE": "DCM4CHEE",
           "ACTIVE_PACS": "orthanc, dcm4chee", "PACS_ENABLED": "false", "PACS_RETRY_ATTEMPTS": "5",
           "PACS_RETRY_DELAY": "0.5"}
    config = build_config(raw, env)
    o, d = config.pacs["orthanc"], config.pacs["dcm4chee"]
    assert (o.url, o.username, o.password.reveal(), o.ae_title) == ("http://env:8042", "envuser", "pw", "ORTH")
    assert d.type == "dcm4chee" and d.stow_base == "http://dcm:8080/dcm4chee-arc/aets/DCM4CHEE/rs"
    assert config.delivery.active_pacs == ("orthanc", "dcm4chee")
    assert config.delivery.enabled is False
    assert (config.delivery.retry_attempts, config.delivery.retry_delay) == (5, 0.5)


def test_any_pacs_name_gets_its_environment_variables():
    config = build_config({**WATCH, "pacs": {"cloud": {"type": "dicomweb", "url": "https://x/dicomweb"}}},
                          {"CLOUD_PASSWORD": "t0p", "CLOUD_USERNAME": "u", "ACTIVE_PACS": "cloud"})
    assert config.pacs["cloud"].password.reveal() == "t0p"
    assert config.pacs["cloud"].stow_base == "https://x/dicomweb"


@pytest.mark.parametrize("raw, env, words", [
    ({"pacs": {"orthanc": {"url": "http://x", "pasword": "a"}}}, {}, ["pacs.orthanc.pasword", "did you mean 'password'"]),
    ({"delivery": {"retry_attempts": "three"}}, {}, ["delivery.retry_attempts", "whole number"]),
    ({"pacs": {"orthanc": {"type": "orthanc"}}}, {}, ["pacs.orthanc.url is missing", "ORTHANC_URL"]),
    ({}, {"ACTIVE_PACS": "nowhere"}, ["'nowhere'", "NOWHERE_URL"]),
    ({}, {"PACS_RETRY_DELAY": "soon"}, ["PACS_RETRY_DELAY", "number of seconds"]),
    ({}, {"PACS_ENABLED": "maybe"}, ["PACS_ENABLED", "true or false"]),
    ({"watch": [{"path": "/a", "observer": "magic"}]}, {}, ["watch[0].observer", "polling"]),
    ({"pacs": {"x": {"url": "ftp://x"}}}, {}, ["pacs.x.url", "http://"]),
    ({"pacs": {"orthanc": {"url": "http://x", "password": 5}}}, {}, ["pacs.orthanc.password", "(hidden)"]),
    ({"delivery": {"history_days": -1}}, {}, ["delivery.history_days", "0 to 36500 days (0: no history)"]),
])
def test_bad_config_names_the_key_and_the_fix(raw, env, words):
    with pytest.raises(ConfigError) as exc:
        build_config(raw, env)
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unreadable_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, {})


def test_secrets_are_masked_everywhere():
    config = build_config({**WATCH, "pacs": {"orthanc": {"url": "http://x", "password": "hunter2",
                                                          "token": "tok-secret"}}}, {})
    text = to_toml(config) + repr(config) + str(config.pacs["orthanc"])
    assert "hunter2" not in text and "tok-secret" not in text
    assert "********" in text
    assert to_toml(config, mask=False).count("hunter2") == 1
    assert Secret("a") == Secret("a") and not Secret("")


def test_password_file_is_read(tmp_path):
    from relaypacsd.config import resolve_secret

    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    config = build_config({**WATCH, "pacs": {"orthanc": {"url": "http://x", "password_file": str(pw)}}}, {})
    assert resolve_secret(config.pacs["orthanc"], "password").reveal() == "from-file"
    missing = build_config({**WATCH, "pacs": {"orthanc": {"url": "http://x", "password_file": "/nonexistent"}}}, {})
    with pytest.raises(ConfigError, match="password_file"):
        resolve_secret(missing.pacs["orthanc"], "password")


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path):
    cfg = tmp_path / "relaypacs.toml"
    cfg.write_text('[[watch]]\npath = "/tmp/x"\n[pacs.orthanc]\nurl = "http://x"\npasword = "hunter2"\n')
    proc = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "config", "show"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "pacs.orthanc.pasword" in proc.stderr and "Traceback" not in proc.stderr
    assert "hunter2" not in proc.stderr


def test_config_show_masks_environment_password(tmp_path):
    cfg = tmp_path / "relaypacs.toml"
    cfg.write_text('[[watch]]\npath = "/tmp/x"\n')
    env = {"ORTHANC_URL": "http://127.0.0.1:8042", "ORTHANC_PASSWORD": "s3cr3t-pw", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "config", "show"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "s3cr3t-pw" not in proc.stdout + proc.stderr
    assert 'password = "********"' in proc.stdout


def test_example_config_parses_and_documents_every_key():
    from dataclasses import fields
    from pathlib import Path

    from relaypacsd.config import (AuditConfig, DaemonConfig, DeliveryConfig, JournalConfig, PacsConfig, WatchConfig,
                                   WebConfig)

    example = Path(__file__).resolve().parent.parent / "relaypacs.toml.example"
    config = load_config(example, {})
    assert config.watch and config.pacs["orthanc"].url
    text = example.read_text()
    for cls in (DaemonConfig, DeliveryConfig, JournalConfig, WatchConfig, PacsConfig, AuditConfig, WebConfig):
        for f in fields(cls):
            if f.name != "name" or cls is WatchConfig:
                assert f"\n{f.name} = " in text, f"{cls.__name__}.{f.name} is not documented in relaypacs.toml.example"


def test_credentials_in_the_url_are_refused_without_echoing_them():
    with pytest.raises(ConfigError) as exc:
        build_config(WATCH, {"ORTHANC_URL": "http://admin:hunter2@pacs:8042"})
    assert "ORTHANC_USERNAME" in str(exc.value) and "hunter2" not in str(exc.value)


class TestGateways:
    """[journal], daemon.node, lease_seconds and watch names (issue #14): one line naming the key and the fix."""

    def test_defaults_are_one_gateway_on_sqlite_named_after_the_host(self):
        import socket

        config = build_config({"watch": [{"path": "/srv/relaypacs/ct/"}]}, {})
        assert (config.journal.url, config.journal.shared, config.daemon.lease_seconds) == ("", False, 30.0)
        assert config.node == socket.gethostname() and config.watch[0].name == "ct"

    def test_a_postgresql_journal_node_and_names_from_the_file_or_the_environment(self):
        raw = {"watch": [{"path": "/mnt/share/ct", "name": "ct-share"}], "daemon": {"node": "gw-a", "lease_seconds": 20},
               "journal": {"url": "postgresql://relaypacs@db.example.org/relaypacs", "password_file": "/run/pw"}}
        config = build_config(raw, {})
        assert (config.node, config.watch[0].name, config.journal.shared) == ("gw-a", "ct-share", True)
        env = {"RELAYPACS_NODE": "gw-b", "RELAYPACS_JOURNAL_URL": "postgresql://other@db/relaypacs"}
        config = build_config(raw, env)
        assert (config.node, config.journal.url) == ("gw-b", "postgresql://other@db/relaypacs")
        assert "[journal]" in to_toml(config)

    @pytest.mark.parametrize("raw, words", [
        ({"journal": {"url": "mysql://db/x"}}, ["journal.url", "postgresql://", "'mysql'"]),
        ({"journal": {"url": "postgresql://u:hunter2@db/x"}}, ["journal.url holds a password", "password_file"]),
        ({"journal": {"url": "postgresql://u@db"}}, ["journal.url names no database"]),
        ({"journal": {"url": "postgresql://u@db:99999/x"}}, ["journal.url", "port"]),
        ({"journal": {"password_file": "/run/pw"}}, ["journal.password_file", "journal.url is empty"]),
        ({"journal": {"uri": "x"}}, ["journal.uri", "did you mean 'url'"]),
        ({"daemon": {"node": "gw a"}}, ["daemon.node", "letters"]),
        ({"daemon": {"lease_seconds": 4, "heartbeat_interval": 5}}, ["daemon.lease_seconds", "twice"]),
        ({"watch": [{"path": "/a/ct"}, {"path": "/b/ct"}]}, ["watch[1].name = 'ct'", "watch[0]", "own name"]),
        ({"watch": [{"path": "/a/ct", "name": "c/t"}]}, ["watch[0].name", "same name for this root"]),
    ])
    def test_bad_gateway_keys_name_the_key_and_the_fix(self, raw, words):
        raw = {"watch": [{"path": "/srv/relaypacs/ct"}], **raw}
        with pytest.raises(ConfigError) as exc:
            build_config(raw, {})
        message = str(exc.value)
        assert "\n" not in message and "hunter2" not in message
        for word in words:
            assert word in message, message


def test_audit_is_off_by_default_and_takes_a_syslog_url():
    assert build_config(WATCH, {}).audit.syslog == ""
    audit = build_config({**WATCH, "audit": {"syslog": "udp://audit.example.org", "source_id": "GW_2"}}, {}).audit
    assert (audit.syslog, audit.source_id, audit.queue_size) == ("udp://audit.example.org", "GW_2", 10000)
    assert "[audit]" in to_toml(build_config({**WATCH, "audit": {"syslog": "tcp://a:514"}}, {}))


@pytest.mark.parametrize("audit, words", [
    ({"syslog": "http://audit:6514"}, ["audit.syslog = 'http://audit:6514'", "tcp://, udp:// or tls://", "tls://"]),
    ({"syslog": "tcp://audit:0"}, ["audit.syslog", "port must be a number from 1 to 65535"]),
    ({"syslog": "tcp://audit:99999"}, ["audit.syslog", "port must be a number"]),
    ({"syslog": "tls://"}, ["audit.syslog", "no host name"]),
    ({"syslog": "tcp://audit:514/path"}, ["audit.syslog", "only a host and a port"]),
    ({"syslog": "tcp://udp://x"}, ["audit.syslog"]),
    ({"syslog": "tcp://a:514", "ca_bundle": "/etc/ssl/certs"}, ["audit.ca_bundle", "use tls://"]),
    ({"syslog": "tls://a", "ca_bundle": "/no/such/ca.pem"}, ["audit.ca_bundle", "no such file"]),
    ({"syslog": "tls://a", "client_cert": "/no/cert.pem"}, ["audit.client_cert", "no such file"]),
    ({"syslog": "tcp://a", "source_id": ""}, ["audit.source_id", "1 to 64 printable"]),
    ({"syslog": "tcp://a", "source_id": "x" * 65}, ["audit.source_id"]),
    ({"syslog": "tcp://a", "queue_size": 0}, ["audit.queue_size", "1 to 1e+06"]),
    ({"syslog": "tcp://a", "queue_size": "many"}, ["audit.queue_size", "whole number"]),
    ({"sislog": "tcp://a"}, ["audit.sislog", "did you mean 'syslog'"]),
    ("tcp://a", ["'audit' must be a table"]),
])
def test_bad_audit_settings_name_the_key_and_the_fix(audit, words):
    with pytest.raises(ConfigError) as exc:
        build_config({**WATCH, "audit": audit}, {})
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_an_audit_url_with_a_password_is_refused_without_showing_it():
    with pytest.raises(ConfigError) as exc:
        build_config({**WATCH, "audit": {"syslog": "tcp://user:s3cret@audit:514"}}, {})
    assert "s3cret" not in str(exc.value) and "only a host and a port" in str(exc.value)


def test_bad_audit_settings_stop_the_command_line_with_one_line(tmp_path):
    cfg = tmp_path / "relaypacs.toml"
    cfg.write_text('[[watch]]\npath = "/srv/relaypacs/ct"\n[audit]\nsyslog = "syslog.example.org:514"\n')
    res = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), "check"], capture_output=True, text=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "audit.syslog" in res.stderr


def test_audit_tls_files_that_are_not_certificates_are_refused_at_load(tmp_path):
    """Checked when the config is read, so a reload with a broken certificate is refused, not half done."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for key in ("ca_bundle", "client_cert"):
        with pytest.raises(ConfigError) as exc:
            build_config({**WATCH, "audit": {"syslog": "tls://audit:6514", key: str(junk),
                                             **({"client_key": str(junk)} if key == "client_cert" else {})}}, {})
        assert "audit.ca_bundle / client_cert / client_key: unusable" in str(exc.value) and "\n" not in str(exc.value)
