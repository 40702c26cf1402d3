"""The users file."""

from __future__ import annotations

import os
import stat

import pytest

from relaypacsd.errors import ConfigError
from relaypacsd.web.users import User, Users, hash_password, read_users, write_users


def test_the_file_is_private_holds_argon2_hashes_and_the_password_checks(tmp_path):
    path = tmp_path / "u.json"
    write_users(path, {"olga": User("olga", "operator", hash_password("a-long-password"))})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "a-long-password" not in path.read_text() and "$argon2id$" in path.read_text()
    users = Users(path)
    assert users.authenticate("olga", "a-long-password").role == "operator"
    assert users.authenticate("olga", "wrong") is None and users.authenticate("nobody", "x") is None
    assert "argon2" not in repr(users.get("olga"))


def test_a_users_file_that_is_not_ours_is_one_line_naming_the_key(tmp_path):
    path = tmp_path / "u.json"
    for text in ("not json", '{"users": {"x": {"role": "admin", "hash": "$argon2id$..."}}}', "[]"):
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            read_users(path)
        assert "web.users_file" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="relaypacsd user add"):
        read_users(tmp_path / "missing.json")


def test_a_running_dashboard_reads_the_file_again_when_it_changes(tmp_path):
    path = tmp_path / "u.json"
    write_users(path, {})
    users = Users(path)
    assert users.get("vic") is None
    write_users(path, {"vic": User("vic", "viewer", hash_password("another-password"))})
    assert users.get("vic").role == "viewer"
