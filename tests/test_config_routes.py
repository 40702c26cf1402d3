"""[[route]] tables in relaypacs.toml (#11): parsed in order, each mistake one line naming the route and the fix."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from relaypacsd import cli
from relaypacsd.config import build_config, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACS = {"orthanc": {"url": "http://127.0.0.1:8042"}, "breast-pacs": {"url": "http://127.0.0.1:8043"},
        "research": {"url": "http://127.0.0.1:8044"}}
# The contract, as written there
CONTRACT = [
    {"name": "mammo", "match": {"Modality": ["MG", "DBT"]}, "to": ["breast-pacs"]},
    {"name": "research-brains", "match": {"Modality": "MR", "StudyDescription": "re:(?i)brain",
                                          "path": "glob:research/**"}, "to": ["orthanc", "research"]},
    {"name": "default", "to": ["orthanc"]},
]


def config(routes, **extra):
    return build_config({"watch": [{"path": "/srv/relaypacs/ct"}], "pacs": PACS, "route": routes, **extra}, {})


def test_the_contract_parses_in_order():
    routes = config(CONTRACT).routes
    assert [(r.name, r.to, r.go_on) for r in routes] == [
        ("mammo", ("breast-pacs",), False), ("research-brains", ("orthanc", "research"), False),
        ("default", ("orthanc",), False)]
    assert [c.key for c in routes[1].conditions] == ["Modality", "StudyDescription", "path"]
    assert routes[2].conditions == ()


def test_no_route_tables_is_no_routing():
    assert build_config({"pacs": PACS}, {}).routes == ()


def test_continue_and_a_single_destination_as_a_string():
    routes = config([{"name": "research", "match": {"path": "glob:research/**"}, "to": "research",
                      "continue": True}, {"name": "default", "to": ["orthanc", "orthanc"]}]).routes
    assert routes[0].go_on and routes[0].to == ("research",) and routes[1].to == ("orthanc",)


def test_config_show_prints_the_routes_back_as_written():
    text = to_toml(config([*CONTRACT[:2], {"name": "research", "match": {"path": "glob:research/**"},
                                           "to": ["research"], "continue": True}, CONTRACT[2]]))
    again = build_config(tomllib.loads(text), {})
    assert again.routes == config([*CONTRACT[:2], {"name": "research", "match": {"path": "glob:research/**"},
                                                   "to": ["research"], "continue": True}, CONTRACT[2]]).routes


BROKEN = {
    "unknown keyword": ({"name": "mammo", "match": {"Modalty": "MG"}, "to": ["orthanc"]},
                        "route 'mammo': match key 'Modalty' is not a DICOM keyword: did you mean 'Modality'?"),
    "bad regex": ({"name": "brains", "match": {"StudyDescription": "re:(?i)brain("}, "to": ["orthanc"]},
                  "route 'brains': match.StudyDescription = 're:(?i)brain(': not a valid regular expression"),
    "unknown PACS": ({"name": "mammo", "to": ["breast"]},
                     "route 'mammo': to names 'breast', which is not configured (configured: breast-pacs, orthanc, "
                     "research): add a [pacs.breast] table with a url, or fix the name"),
    "PACS in capitals": ({"name": "mammo", "to": ["Orthanc"]}, "did you mean 'orthanc'? PACS names are lower case"),
    "no to": ({"name": "mammo", "match": {"Modality": "MG"}}, "route 'mammo': to must name the PACS it sends to"),
    "empty to": ({"name": "mammo", "to": []}, "route 'mammo': to must name the PACS it sends to"),
    "no name": ({"to": ["orthanc"]}, "route[0] has no name: give it name = \"mammo\""),
    "a bad name": ({"name": "mammo,2", "to": ["orthanc"]}, "route 'mammo,2': use letters, digits, '-', '_' and '.'"),
    "unknown key": ({"name": "mammo", "to": ["orthanc"], "contine": True},
                    "route 'mammo': unknown key 'contine': did you mean 'continue'?"),
    "continue not a bool": ({"name": "mammo", "to": ["orthanc"], "continue": "yes"}, "must be true or false"),
    "match not a table": ({"name": "mammo", "to": ["orthanc"], "match": "MG"}, "match must be a table"),
    "bulk data": ({"name": "px", "to": ["orthanc"], "match": {"PixelData": "x"}}, "which a route cannot match"),
    "value not a string": ({"name": "mammo", "to": ["orthanc"], "match": {"Modality": 7}},
                           "match.Modality = 7: use a string or a non-empty list of strings"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_bad_route_is_one_line_naming_the_route_and_the_fix_exit_2(tmp_path, capsys, name):
    table, words = BROKEN[name]
    conf = tmp_path / "relaypacs.toml"
    conf.write_text(tomli_w.dumps({"watch": [{"path": str(tmp_path / "spool")}], "pacs": PACS, "route": [table]}))
    assert cli.main(["-c", str(conf), "config", "show"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("relaypacsd: error:") and words in err, err


def test_a_route_after_one_that_takes_every_file_is_refused():
    with pytest.raises(Exception, match=re.escape("route 'default' matches every file, so route 'mammo' after it is "
                                                  "never tried: put 'default' last, or give it continue = true")):
        config([CONTRACT[2], CONTRACT[0]])
    assert config([{**CONTRACT[2], "continue": True}, CONTRACT[0]]).routes  # with continue it adds and goes on


def test_two_routes_with_one_name_are_refused():
    with pytest.raises(Exception, match="route 'mammo': two routes have this name"):
        config([CONTRACT[0], CONTRACT[0]])


def test_the_example_config_carries_routes_that_parse_once_uncommented():
    """relaypacs.toml.example carries the routes commented out; uncommented they are valid [[route]] tables."""
    example = (Path(__file__).resolve().parent.parent / "relaypacs.toml.example").read_text()
    block = example[example.index("# [[route]]"):example.index("# Environment variables")]
    text = "\n".join(line[2:] if line.startswith("# ") else line for line in block.splitlines())
    routes = build_config({"pacs": PACS, **tomllib.loads(text)}, {}).routes
    assert [r.name for r in routes] == ["research", "mammo", "research-brains", "default"]
    assert routes[0].go_on and routes[-1].conditions == ()


def test_a_config_without_routes_does_not_load_pydicom(tmp_path):
    """Every command reads the config; only one with [[route]] tables needs pydicom's dictionary."""
    conf = tmp_path / "relaypacs.toml"
    conf.write_text(tomli_w.dumps({"watch": [{"path": str(tmp_path)}], "pacs": PACS}))
    code = f"import sys; from relaypacsd.config import load_config; load_config({str(conf)!r}, {{}}); " \
           "print('pydicom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
