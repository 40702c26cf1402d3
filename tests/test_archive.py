"""Safe unpacking of zips dropped into an inbox."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from relaypacsd import archive
from relaypacsd import renames
from relaypacsd.archive import BadArchive, Limits, is_zip, resume_unpacks, unpack, unpack_to_sending
from relaypacsd.spool import Spool
from tests.dicomfactory import write_instance


def _zip(path: Path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_unpack_good_zip_into_sending(tmp_path):
    spool = Spool(tmp_path / "root")
    spool.prepare()
    write_instance(tmp_path / "a.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    z = _zip(spool.sending / "study.zip", {"series1/a.dcm": data, "b.dcm": data, "__MACOSX/._a.dcm": b"x"})
    assert is_zip(z)
    files = unpack_to_sending(spool, z)
    names = sorted(str(spool.relative(f)) for f in files)
    assert names == ["study/b.dcm", "study/series1/a.dcm"]
    assert all(f.read_bytes() == data for f in files)
    assert not list(spool.root.glob(".relaypacs-unzip-*"))


@pytest.mark.parametrize("name", ["../evil.dcm", "/etc/evil", "a/../../evil", "C:/evil", "..\\evil"])
def test_path_traversal_refused(tmp_path, name):
    z = _zip(tmp_path / "t.zip", {name: b"x"})
    (tmp_path / "out").mkdir()
    with pytest.raises(BadArchive, match="path|traversal|absolute"):
        unpack(z, tmp_path / "out")
    assert not (tmp_path / "evil.dcm").exists()


def test_symlink_refused(tmp_path):
    z = tmp_path / "s.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "out").mkdir()
    with pytest.raises(BadArchive, match="symbolic link"):
        unpack(z, tmp_path / "out")


def test_zip_bomb_and_limits(tmp_path):
    z = _zip(tmp_path / "b.zip", {"zeros": b"\0" * (20 * 1024 * 1024)})
    (tmp_path / "o1").mkdir()
    with pytest.raises(BadArchive, match="zip bomb"):
        unpack(z, tmp_path / "o1")
    many = _zip(tmp_path / "m.zip", {f"f{i}": b"x" for i in range(20)})
    (tmp_path / "o2").mkdir()
    with pytest.raises(BadArchive, match="entries"):
        unpack(many, tmp_path / "o2", Limits(max_entries=10))
    (tmp_path / "o3").mkdir()
    with pytest.raises(BadArchive, match="limit"):
        unpack(many, tmp_path / "o3", Limits(max_total_bytes=5))


def test_corrupt_zip_and_nothing_moved(tmp_path):
    spool = Spool(tmp_path / "root")
    spool.prepare()
    z = spool.sending / "bad.zip"
    z.write_bytes(b"PK\x03\x04" + b"garbage" * 10)
    with pytest.raises(BadArchive, match="not a readable zip"):
        unpack_to_sending(spool, z)
    assert list(spool.files("sending")) == [z]
    assert not list(spool.root.glob(".relaypacs-unzip-*"))


def test_daemon_unpacks_zip_and_rejects_bad_one(tmp_path):
    from relaypacsd.config import build_config
    from relaypacsd.daemon import Daemon

    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")}, "delivery": {"enabled": False},
                           "watch": [{"path": str(tmp_path / "root")}]}, {})
    daemon = Daemon(config, senders={})
    spool = daemon.spools[0]
    spool.prepare()
    write_instance(tmp_path / "a.dcm")
    good = _zip(spool.sending / "good.zip", {"x/a.dcm": (tmp_path / "a.dcm").read_bytes()})
    daemon._validate(spool, good)
    assert (spool.sending / "good" / "x" / "a.dcm").exists()
    assert (spool.sent / "good.zip").exists()
    assert daemon._intake.qsize() == 1
    bad = _zip(spool.sending / "bad.zip", {"../x": b"1"})
    daemon._validate(spool, bad)
    assert (spool.failed / "bad.zip").exists() and (spool.failed / "bad.zip.error.json").exists()
    daemon.journal.close()


def test_daemon_start_removes_half_unpacked_temp_folders(tmp_path):
    from relaypacsd.config import build_config
    from relaypacsd.daemon import Daemon

    root = tmp_path / "root"
    stale = root / ".relaypacs-unzip-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "member.dcm").write_bytes(b"half")
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")}, "watch": [{"path": str(root)}],
                           "delivery": {"enabled": False}}, {})
    daemon = Daemon(config)
    daemon.start()
    try:
        assert not stale.exists()
    finally:
        daemon.shutdown(timeout=5)


def _killed_at_rename(spool: Spool, z: Path, n: int) -> int:
    """Unpack `z` in a child process that dies (os._exit, no clean-up) just before its n-th rename."""
    pid = os.fork()
    if pid == 0:  # the child: count renames, die at the n-th
        calls = [0]
        real = renames.rename_noreplace

        def dying_rename(src, dst):
            calls[0] += 1
            if calls[0] == n:
                os._exit(9)
            return real(src, dst)

        archive.rename_noreplace = dying_rename
        renames.rename_noreplace = dying_rename
        try:
            unpack_to_sending(spool, z)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


# 7 renames: the commit; a.dcm, b.dcm, c.dcm (the first file of each new folder is tried once before its
# folder exists); the zip to sent/. Killed before each of them, and (8) not killed.
@pytest.mark.parametrize("n", range(1, 9))
def test_killed_at_any_rename_of_an_unpack_each_member_reaches_sending_once(tmp_path, n):
    spool = Spool(tmp_path / "root")
    spool.prepare()
    members = {}
    for name in ("a.dcm", "s1/b.dcm", "s1/c.dcm"):
        write_instance(tmp_path / "m" / name)
        members[f"study/{name}"] = (tmp_path / "m" / name).read_bytes()
    z = _zip(spool.sending / "study.zip", {k.removeprefix("study/"): v for k, v in members.items()})
    status = _killed_at_rename(spool, z, n)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == (0 if n == 8 else 9)
    resume_unpacks(spool)  # what start-up does
    if z.exists():  # what recovery of sending/ does: the zip was not committed, unpack it again
        unpack_to_sending(spool, z)
    got = {str(spool.relative(p)): p.read_bytes() for p in spool.files("sending")}
    assert got == members  # each exactly once, under its own name (no "~1" copies)
    assert [p.name for p in spool.files("sent")] == ["study.zip"] and not z.exists()
    assert not list(spool.root.glob(".relaypacs-unzip-*"))


def test_a_commit_by_the_link_fallback_killed_before_its_unlink_unpacks_once(tmp_path, monkeypatch):
    """On NFS the commit rename is link(2) then unlink(2): killed in between, the zip is both in the temp folder
    (committed) and in sending/. Start-up finished the unpack, then recovery unpacked the zip again: every
    member twice."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    spool = Spool(tmp_path / "root")
    spool.prepare()
    members = {}
    for name in ("a.dcm", "s1/b.dcm"):
        write_instance(tmp_path / "m" / name)
        members[f"study/{name}"] = (tmp_path / "m" / name).read_bytes()
    z = _zip(spool.sending / "study.zip", {k.removeprefix("study/"): v for k, v in members.items()})
    tmp = spool.root / f"{archive.TEMP_PREFIX}killed"  # what the killed unpack left
    (tmp / "members").mkdir(parents=True)
    unpack(z, tmp / "members")
    archive._write_manifest(tmp, spool.relative(z))
    os.link(z, tmp / archive.SOURCE)
    resume_unpacks(spool)  # what start-up does
    if z.exists():  # what recovery of sending/ does
        unpack_to_sending(spool, z)
    got = {str(spool.relative(p)): p.read_bytes() for p in spool.files("sending")}
    assert got == members  # each exactly once
    assert [p.name for p in spool.files("sent")] == ["study.zip"] and not z.exists()
    assert not list(spool.root.glob(".relaypacs-unzip-*"))


def test_two_unpacks_of_one_zip_commit_once(tmp_path, monkeypatch):
    """A reload whose wait for a long unpack ran out starts a second unpack of the same zip."""
    spool = Spool(tmp_path / "root")
    spool.prepare()
    write_instance(tmp_path / "a.dcm")
    z = _zip(spool.sending / "study.zip", {"a.dcm": (tmp_path / "a.dcm").read_bytes()})
    real_unpack, second = archive.unpack, []

    def slow_first(*args, **kwargs):  # the first unpack is still writing when the second one commits
        result = real_unpack(*args, **kwargs)
        if not second:
            second.append(None)
            second[0] = unpack_to_sending(spool, z)
        return result

    monkeypatch.setattr(archive, "unpack", slow_first)
    first = unpack_to_sending(spool, z)
    assert first == [] and len(second[0]) == 1
    assert [str(spool.relative(p)) for p in spool.files("sending")] == ["study/a.dcm"]
    assert not list(spool.root.glob(".relaypacs-unzip-*"))


def test_a_file_named_like_the_zip_folder_does_not_strand_the_unpack(tmp_path):
    """sending/CT1 (a file) beside sending/CT1.zip: the members go to CT1~1/, the zip to sent/."""
    spool = Spool(tmp_path / "root")
    spool.prepare()
    write_instance(tmp_path / "a.dcm")
    (spool.sending / "CT1").write_bytes(b"a file of that name")
    z = _zip(spool.sending / "CT1.zip", {"a.dcm": (tmp_path / "a.dcm").read_bytes()})
    moved = unpack_to_sending(spool, z)
    assert [str(spool.relative(p)) for p in moved] == ["CT1~1/a.dcm"]
    assert (spool.sent / "CT1.zip").exists() and not list(spool.root.glob(".relaypacs-unzip-*"))


def test_a_failure_after_the_commit_says_where_the_files_wait(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "root")
    spool.prepare()
    write_instance(tmp_path / "a.dcm")
    z = _zip(spool.sending / "CT1.zip", {"a.dcm": (tmp_path / "a.dcm").read_bytes()})
    monkeypatch.setattr(Spool, "_move", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(archive.UnpackInterrupted, match="wait in .*relaypacs-unzip-.*restart the service") as err:
        unpack_to_sending(spool, z)
    assert "No space left" in str(err.value)
    monkeypatch.undo()
    assert [str(spool.relative(p)) for p in resume_unpacks(spool)] == ["CT1/a.dcm"]  # the next start
    assert (spool.sent / "CT1.zip").exists()
