"""`relaypacsd route` (#11), in-process: the rule tester's words, its JSON, where a file is taken to be, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from relaypacsd import cli
from relaypacsd.commands.common import place
from tests.dicomfactory import write_tagged

ROUTES = [
    {"name": "research", "match": {"path": "glob:research/**"}, "to": ["research"], "continue": True},
    {"name": "mammo", "match": {"Modality": ["MG", "DBT"]}, "to": ["breast"]},
    {"name": "by-room", "match": {"watch": "glob:**/ct-room"}, "to": ["main"]},
]


def conf(tmp_path: Path, routes=ROUTES, active=("main", "breast", "research")) -> Path:
    path = tmp_path / "relaypacs.toml"
    path.write_text(tomli_w.dumps({
        "daemon": {"state_dir": str(tmp_path / "state")}, "watch": [{"path": str(tmp_path / "ct-room")}],
        "delivery": {"active_pacs": list(active)},
        "pacs": {n: {"url": f"http://127.0.0.1:{i + 1}"} for i, n in enumerate(("main", "breast", "research"))},
        "route": routes}))
    return path


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_each_file_its_route_and_why_the_routes_before_it_failed(tmp_path, capsys):
    cfg = conf(tmp_path)
    write_tagged(tmp_path / "in" / "research" / "mg.dcm", "MG")
    write_tagged(tmp_path / "in" / "ct.dcm", "CT")
    code, out = run(capsys, "-c", str(cfg), "route", str(tmp_path / "in"))
    assert code == 1  # ct.dcm is in no watch root: the by-room route cannot take it
    assert out.splitlines() == [
        "ct.dcm: NO ROUTE matches: it would go to failed/ (stage routing)",
        '    research  no: path "ct.dcm" does not match glob:research/**',
        '    mammo     no: Modality is "CT", not one of "MG", "DBT"',
        "    by-room   no: watch is unknown (not in a watch root)",
        "research/mg.dcm: route research,mammo -> research, breast",
        "    research  yes -> research",
        "    mammo     yes -> breast",
        "2 file(s): 1 routed, 1 to failed/ (no route, or no active PACS), 0 invalid"]


def test_watch_takes_files_outside_a_root_as_if_dropped_there(tmp_path, capsys):
    cfg = conf(tmp_path)
    write_tagged(tmp_path / "in" / "ct.dcm", "CT")
    code, out = run(capsys, "-c", str(cfg), "route", "--json", "--watch", str(tmp_path / "ct-room"),
                    str(tmp_path / "in"))
    found = json.loads(out)
    assert code == 0
    assert [(r["path"], r["routes"], r["destinations"]) for r in found] == [("ct.dcm", ["by-room"], ["main"])]


def test_a_file_in_a_watch_root_is_routed_by_its_place_there(tmp_path, capsys):
    cfg = conf(tmp_path)
    write_tagged(tmp_path / "ct-room" / "failed" / "research" / "a.dcm", "CT")
    code, out = run(capsys, "-c", str(cfg), "route", "--json", str(tmp_path / "ct-room" / "failed" / "research"))
    (r,) = json.loads(out)
    assert (r["watch"], r["path"]) == (str(tmp_path / "ct-room"), "research/a.dcm")
    assert r["routes"] == ["research", "by-room"]


def test_inactive_pacs_are_skipped_and_a_file_left_with_none_fails_the_test(tmp_path, capsys):
    cfg = conf(tmp_path, active=("main",))
    write_tagged(tmp_path / "in" / "mg.dcm", "MG")
    code, out = run(capsys, "-c", str(cfg), "route", str(tmp_path / "in"))
    assert code == 1 and out.splitlines()[0] == ("mg.dcm: route mammo: NO ACTIVE PACS (not active, skipped: breast): "
                                                  "it would go to failed/ (stage routing)")


def test_invalid_files_and_no_routes_at_all(tmp_path, capsys):
    cfg = conf(tmp_path, routes=[])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.dcm").write_bytes(b"junk" * 40)
    write_tagged(tmp_path / "in" / "ct.dcm", "CT")
    code, out = run(capsys, "-c", str(cfg), "route", str(tmp_path / "in"))
    lines = out.splitlines()
    assert code == 1
    assert lines[0] == "no [[route]] configured: every file goes to every active PACS (main, breast, research)"
    assert lines[1] == "ct.dcm: every active PACS -> breast, main, research"
    assert lines[2].startswith("junk.dcm: not sent, invalid: not a DICOM file")


def test_a_persons_name_never_shows(tmp_path, capsys):
    cfg = conf(tmp_path, routes=[{"name": "vip", "match": {"PatientName": "re:^ROYAL"}, "to": ["main"]}])
    write_tagged(tmp_path / "in" / "ct.dcm", "CT", PatientName="Müller^Jürgen")
    code, out = run(capsys, "-c", str(cfg), "route", str(tmp_path / "in"))
    assert code == 1 and "PatientName does not match re:^ROYAL" in out and "Müller" not in out


def test_place_is_the_path_below_the_folder_of_a_watch_root_or_below_the_folder_named(tmp_path):
    root = tmp_path / "root"
    assert place(root / "sending" / "a" / "b.dcm", tmp_path, [root]) == (str(root), "a/b.dcm")
    assert place(tmp_path / "x" / "b.dcm", tmp_path, [root]) == ("", "x/b.dcm")
    assert place(tmp_path / "x" / "b.dcm", tmp_path / "x", [root], "/srv/ct") == ("/srv/ct", "b.dcm")
