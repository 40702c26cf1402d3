"""`relaypacsd user` and `relaypacsd pause|resume` in-process, and `status` telling a pause."""

from __future__ import annotations

import io
import json

import pytest

from relaypacsd.cli import main
from relaypacsd.web.users import read_users


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\n[web]\nusers_file = "{tmp_path}/users.json"\n'
                    f'[[watch]]\npath = "{tmp_path}/root"\n[pacs.orthanc]\nurl = "http://127.0.0.1:1"\n')
    return path


def test_user_add_list_remove(cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert main(["-c", str(cfg), "user", "add", "olga", "--role", "operator", "--password-stdin"]) == 0
    users = read_users(tmp_path / "users.json")
    assert users["olga"].role == "operator"
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert main(["-c", str(cfg), "user", "add", "olga", "--role", "viewer", "--password-stdin"]) == 1
    assert "--update" in capsys.readouterr().err
    assert main(["-c", str(cfg), "user", "list"]) == 0
    out = capsys.readouterr().out
    assert "olga" in out and "argon2" not in out
    assert main(["-c", str(cfg), "user", "remove", "olga"]) == 0
    assert read_users(tmp_path / "users.json") == {}


def test_a_short_password_is_refused_and_nothing_written(cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["-c", str(cfg), "user", "add", "vic", "--role", "viewer", "--password-stdin"]) == 1
    assert "at least" in capsys.readouterr().err and not (tmp_path / "users.json").exists()


def test_user_add_without_a_users_file_key_says_which_key(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(f'[[watch]]\npath = "{tmp_path}/root"\n')
    assert main(["-c", str(path), "user", "list"]) == 1
    assert "web.users_file is not set" in capsys.readouterr().err


def test_pause_and_resume_from_the_command_line_show_in_status(cfg, capsys):
    assert main(["-c", str(cfg), "pause", "orthanc"]) == 0
    assert main(["-c", str(cfg), "pause", "orthanc"]) == 1
    assert "already paused" in capsys.readouterr().err
    assert main(["-c", str(cfg), "status", "--json"]) == 0
    pacs = json.loads(capsys.readouterr().out)["pacs"][0]
    assert pacs["paused"] is True and "command line" in pacs["paused_by"]
    assert main(["-c", str(cfg), "status"]) == 0
    assert "PAUSED" in capsys.readouterr().out
    assert main(["-c", str(cfg), "resume", "orthanc"]) == 0
    assert main(["-c", str(cfg), "pause", "nope"]) == 1
    assert "no active PACS named 'nope'" in capsys.readouterr().err


def test_a_pause_and_a_resume_land_in_the_history_with_who_did_them(cfg, tmp_path, capsys):
    """#13: an action goes through the library code and lands in the history with the user's name."""
    assert main(["-c", str(cfg), "pause", "orthanc"]) == 0
    assert main(["-c", str(cfg), "resume", "orthanc"]) == 0
    capsys.readouterr()
    assert main(["-c", str(cfg), "history", "--pacs", "orthanc", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["outcome"] for r in records] == ["resumed", "paused"]  # newest first
    assert all("command line" in r["user"] for r in records)
