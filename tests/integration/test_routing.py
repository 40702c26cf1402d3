"""Routing against two real Orthancs (#11): each PACS holds exactly the instances its routes name, by the
daemon, `send` and `verify`; `relaypacsd route` says why; an unmatched file fails and a retry sends it once
the routes are fixed; a SIGHUP's new routes apply to files claimed after it, files in sending/ keep theirs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

from relaypacsd.config import load_config
from relaypacsd.localorthanc import LocalOrthanc
from tests.dicomfactory import write_tagged
from tests.integration.daemon_helpers import (config_dict, count_in, daemon_env, daemon_log, start_daemon,
                                              stop_daemon, wait_for, wait_ready)
from tests.integration.pipeline_helpers import captured_log, files, pacs_table, running

ROUTES = [
    {"name": "research", "match": {"path": "glob:research/**"}, "to": ["archive"], "continue": True},
    {"name": "mammo", "match": {"Modality": ["MG", "DBT"]}, "to": ["archive"]},
    {"name": "kinder", "match": {"StudyDescription": "Schädel für Kinder"}, "to": ["archive"]},
    {"name": "brains", "match": {"Modality": "MR", "StudyDescription": "re:(?i)(brain|脳)"},
     "to": ["orthanc", "archive"]},
    {"name": "default", "to": ["orthanc"]},
]
# name below inbox/: (modality, character set, StudyDescription, the routes that match, the PACS that get it)
FILES = {
    "ct/thorax.dcm": ("CT", "ISO_IR 192", "Thorax", "default", {"orthanc"}),
    "mg/left.dcm": ("MG", "ISO_IR 100", "Mammographie beidseits", "mammo", {"archive"}),
    "ped/skull-latin1.dcm": ("CT", "ISO_IR 100", "Schädel für Kinder", "kinder", {"archive"}),
    "ped/skull-utf8.dcm": ("CT", "ISO_IR 192", "Schädel für Kinder", "kinder", {"archive"}),
    "mr/brain.dcm": ("MR", "ISO_IR 192", "脳 MRT – Übersicht", "brains", {"orthanc", "archive"}),
    "mr/knee.dcm": ("MR", "ISO_IR 100", "Kniegelenk rechts", "default", {"orthanc"}),
    "research/s1/liver.dcm": ("US", "ISO_IR 192", "Leber", "research,default", {"archive", "orthanc"}),
    "research/s2/mg.dcm": ("MG", "ISO_IR 192", "Tomosynthese", "research,mammo", {"archive"}),
}


def write_files(staging: Path) -> dict[str, str]:
    """The FILES, pydicom-generated below `staging`; name -> SOPInstanceUID."""
    return {name: write_tagged(staging / name, modality, charset, StudyDescription=text)
            for name, (modality, charset, text, _, _) in FILES.items()}


def write_toml(tmp_path: Path, orthanc: LocalOrthanc, archive: LocalOrthanc, routes: list[dict]) -> Path:
    """The test config with both PACS and `routes`, written atomically (a SIGHUP never reads half a file)."""
    doc = config_dict(tmp_path, orthanc)
    doc["pacs"]["archive"] = pacs_table(archive, connect_timeout=2.0, read_timeout=30.0)
    doc["route"] = routes
    path, tmp = tmp_path / "relaypacs.toml", tmp_path / "relaypacs.toml.tmp"
    tmp.write_text(tomli_w.dumps(doc))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(cfg), *args], capture_output=True,
                          text=True, env=daemon_env(), timeout=120)


def reloaded(proc: subprocess.Popen[bytes]) -> bool:
    """The daemon's last reload is done (its log's last "reload of ..." line says so)."""
    return "done" in daemon_log(proc).split("reload of")[-1]


def expected(sops: dict[str, str], pacs: str) -> set[str]:
    return {sops[name] for name, spec in FILES.items() if pacs in spec[4]}


def test_each_pacs_holds_exactly_what_its_routes_name(tmp_path: Path, clean_orthanc, orthanc_factory) -> None:
    archive = orthanc_factory()
    cfg = write_toml(tmp_path, clean_orthanc, archive, ROUTES)
    staging = tmp_path / "staging"
    sops = write_files(staging)

    # The rule tester, before any file moves: the route, its PACS, and why each route before it failed
    res = cli(cfg, "route", str(staging), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    decided = {r["path"]: r for r in json.loads(res.stdout)}
    assert {p: ",".join(r["routes"]) for p, r in decided.items()} == {p: spec[3] for p, spec in FILES.items()}
    assert {p: set(r["destinations"]) for p, r in decided.items()} == {p: spec[4] for p, spec in FILES.items()}
    assert [t["failed"] for t in decided["mr/knee.dcm"]["tried"]] == [
        'path "mr/knee.dcm" does not match glob:research/**', 'Modality is "MR", not one of "MG", "DBT"',
        'StudyDescription is "Kniegelenk rechts", not "Schädel für Kinder"',
        'StudyDescription "Kniegelenk rechts" does not match re:(?i)(brain|脳)', ""]
    text = cli(cfg, "route", str(staging / "mr" / "brain.dcm")).stdout
    assert text.splitlines()[0] == "brain.dcm: route brains -> orthanc, archive", text
    assert '    kinder    no: StudyDescription is "脳 MRT – Übersicht", not "Schädel für Kinder"' in text

    # `send` by the routes (files stay put)
    res = cli(cfg, "send", str(staging), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert clean_orthanc.list_instance_uids() == expected(sops, "orthanc")
    assert archive.list_instance_uids() == expected(sops, "archive")
    clean_orthanc.reset()
    archive.reset()

    # The daemon
    config = load_config(cfg, {})
    inbox = tmp_path / "spool" / "inbox"
    with captured_log() as log, running(config):
        for entry in sorted(staging.iterdir()):
            shutil.move(str(entry), inbox / entry.name)
        assert wait_for(lambda: len(files(tmp_path, "sent")) == len(FILES), timeout=60), log[-20:]
    assert files(tmp_path, "failed") == []
    assert clean_orthanc.list_instance_uids() == expected(sops, "orthanc")
    assert archive.list_instance_uids() == expected(sops, "archive")
    assert any("PACS forward archive delivered" in line and "kinder" in line.split("routes=")[-1] for line in log)
    assert any("routing: 5 route(s)" in line for line in log)

    # `verify` by the files: each at the PACS its route gives, '-' elsewhere
    res = cli(cfg, "verify", str(tmp_path / "spool" / "sent"), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    marks = {Path(r["file"]).name: (r["orthanc"], r["archive"]) for r in json.loads(res.stdout)}
    assert marks["thorax.dcm"] == ("yes", "-") and marks["left.dcm"] == ("-", "yes")
    assert marks["brain.dcm"] == ("yes", "yes")
    archive.reset()  # the archive loses what it had: verify says so, only where files were routed
    res = cli(cfg, "verify", str(tmp_path / "spool" / "sent"))
    assert res.returncode == 1 and "NOT COMPLETE: 6 instance/PACS pair(s) missing" in res.stderr, res.stdout


def test_an_unmatched_file_fails_at_routing_and_a_retry_sends_it_once_the_routes_are_fixed(
        tmp_path: Path, clean_orthanc) -> None:
    only_mammo = [{"name": "mammo", "match": {"Modality": ["MG", "DBT"]}, "to": ["orthanc"]}]
    cfg = write_toml(tmp_path, clean_orthanc, clean_orthanc, only_mammo)
    proc = start_daemon(cfg)
    try:
        wait_ready(proc)
        sop = write_tagged(tmp_path / "staging" / "ct.dcm", "CT")
        (tmp_path / "staging" / "ct.dcm").rename(tmp_path / "spool" / "inbox" / "ct.dcm")
        failed = tmp_path / "spool" / "failed" / "ct.dcm"
        wait_for(lambda: failed.exists(), 30, message=lambda: daemon_log(proc)[-3000:])
        why = json.loads(failed.with_name("ct.dcm.error.json").read_text())
        assert why["stage"] == "routing" and why["routes"][0]["failed"] == 'Modality is "CT", not one of "MG", "DBT"'
        wait_for(lambda: "routing refused ct.dcm: no route matches this file" in daemon_log(proc), 10)
        res = cli(cfg, "route", str(failed))
        assert res.returncode == 1 and "ct.dcm: NO ROUTE matches: it would go to failed/ (stage routing)" in res.stdout
        assert clean_orthanc.list_instance_uids() == set()

        write_toml(tmp_path, clean_orthanc, clean_orthanc, [*only_mammo, {"name": "default", "to": ["orthanc"]}])
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloaded(proc), 30, message=lambda: daemon_log(proc)[-3000:])
        res = cli(cfg, "retry", str(failed))
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == 1, 30, message=lambda: daemon_log(proc)[-3000:])
    finally:
        assert stop_daemon(proc) == 0
    assert clean_orthanc.list_instance_uids() == {sop}


def test_a_sighup_gives_new_routes_to_files_claimed_after_it_and_files_in_sending_keep_theirs(
        tmp_path: Path, clean_orthanc, orthanc_factory) -> None:
    archive = orthanc_factory()
    v1 = [{"name": "mammo", "match": {"Modality": "MG"}, "to": ["archive"]}, {"name": "default", "to": ["orthanc"]}]
    cfg = write_toml(tmp_path, clean_orthanc, archive, v1)
    archive.stop(timeout=0)  # the mammo files wait in sending/ for it
    proc = start_daemon(cfg)
    back: LocalOrthanc | None = None
    try:
        wait_ready(proc)
        before = [write_tagged(tmp_path / "staging" / f"b{i}.dcm", "MG") for i in range(3)]
        for i in range(3):
            (tmp_path / "staging" / f"b{i}.dcm").rename(tmp_path / "spool" / "inbox" / f"b{i}.dcm")

        def mammo_waiting() -> Any:
            routes = json.loads(cli(cfg, "status", "--json").stdout)["routes"]
            return next(r for r in routes if r["name"] == "mammo")["waiting"] == 3

        wait_for(mammo_waiting, 30, interval=0.5, message=lambda: daemon_log(proc)[-3000:])
        v2 = [{"name": "mammo", "match": {"Modality": "MG"}, "to": ["orthanc"]}, {"name": "default", "to": ["orthanc"]}]
        write_toml(tmp_path, clean_orthanc, archive, v2)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloaded(proc), 30, message=lambda: daemon_log(proc)[-3000:])
        after = [write_tagged(tmp_path / "staging" / f"a{i}.dcm", "MG") for i in range(2)]
        for i in range(2):
            (tmp_path / "staging" / f"a{i}.dcm").rename(tmp_path / "spool" / "inbox" / f"a{i}.dcm")
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == 2, 30, message=lambda: daemon_log(proc)[-3000:])
        assert clean_orthanc.list_instance_uids() == set(after)  # the waiting ones did not change PACS
        assert count_in(tmp_path / "spool", "sending") == 3
        status = json.loads(cli(cfg, "status", "--json").stdout)
        assert [r["to"] for r in status["routes"] if r["name"] == "mammo"] == [["orthanc"]]

        back = LocalOrthanc(archive.workdir, http_port=archive.http_port, dicom_port=archive.dicom_port,
                            username=archive.username, password=archive.password).start()
        wait_for(lambda: count_in(tmp_path / "spool", "sent") == 5, 40, message=lambda: daemon_log(proc)[-3000:])
        assert back.list_instance_uids() == set(before)
    finally:
        assert stop_daemon(proc) == 0
        if back is not None:
            back.stop(timeout=0)
    assert clean_orthanc.list_instance_uids() == set(after)
    assert count_in(tmp_path / "spool", "failed") == 0
