"""Spool: claims, moves, collisions and sidecars (fake filesystem), plus the real no-overwrite rename."""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from relaypacsd import renames
from relaypacsd import spool as spool_mod
from relaypacsd.errors import AlreadyFinished, SpoolError
from relaypacsd.renames import rename_noreplace
from relaypacsd.sidecars import read_sidecar, sidecar_path
from relaypacsd.spool import Spool


@pytest.fixture
def fake_spool(fs, monkeypatch):
    # ctypes renameat2 would reach the real disk, not pyfakefs: use the portable path here.
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    s = Spool(Path("/spool/ct"))
    s.prepare()
    return s


def _drop(s: Spool, rel: str, data: str = "x") -> Path:
    p = s.inbox / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data)
    return p


def test_prepare_creates_the_four_folders(fake_spool):
    for name in ("inbox", "sending", "sent", "failed"):
        assert (fake_spool.root / name).is_dir()


def test_claim_keeps_the_subpath_and_leaves_one_copy(fake_spool):
    src = _drop(fake_spool, "ward/a/img.dcm")
    claimed = fake_spool.claim(src)
    assert claimed == fake_spool.sending / "ward/a/img.dcm"
    assert not src.exists() and claimed.read_text() == "x"


def test_claim_of_a_vanished_file_means_someone_else_took_it(fake_spool):
    src = _drop(fake_spool, "img.dcm")
    assert fake_spool.claim(src) is not None
    assert fake_spool.claim(src) is None


def test_name_collisions_never_overwrite(fake_spool):
    first = fake_spool.claim(_drop(fake_spool, "img.dcm", "one"))
    second = fake_spool.claim(_drop(fake_spool, "img.dcm", "two"))
    assert first.name == "img.dcm" and second.name == "img~1.dcm"
    sent1 = fake_spool.finish(first, "sent")
    third = fake_spool.claim(_drop(fake_spool, "img.dcm", "three"))
    sent3 = fake_spool.finish(third, "sent")
    assert sent1.read_text() == "one" and sent3.read_text() == "three" and sent3.name == "img~1.dcm"


def test_failed_file_gets_a_readable_sidecar_first(fake_spool):
    claimed = fake_spool.claim(_drop(fake_spool, "sub/bad.dcm"))
    failed = fake_spool.finish(claimed, "failed", {"reason": "not a DICOM file", "stage": "validation"})
    assert failed == fake_spool.failed / "sub/bad.dcm"
    side = json.loads(sidecar_path(failed).read_text())
    assert side["reason"] == "not a DICOM file" and side["stage"] == "validation"
    assert "time" in side and side["file"] == "bad.dcm"
    # a second failure of the same name gets its own name and its own sidecar
    again = fake_spool.finish(fake_spool.claim(_drop(fake_spool, "sub/bad.dcm")), "failed", {"reason": "r2"})
    assert again.name == "bad~1.dcm" and read_sidecar(again)["reason"] == "r2"
    assert read_sidecar(failed)["reason"] == "not a DICOM file"


def test_requeue_moves_back_and_drops_the_sidecar(fake_spool):
    failed = fake_spool.finish(fake_spool.claim(_drop(fake_spool, "a.dcm")), "failed", {"reason": "x"})
    back = fake_spool.requeue(failed)
    assert back == fake_spool.sending / "a.dcm" and not failed.exists() and not sidecar_path(failed).exists()


def test_files_skips_sidecars_and_temp_files(fake_spool):
    fake_spool.finish(fake_spool.claim(_drop(fake_spool, "a.dcm")), "failed", {"reason": "x"})
    (fake_spool.failed / ".relaypacs-a.tmp").write_text("t")
    assert [p.name for p in fake_spool.files("failed")] == ["a.dcm"]


def test_every_file_is_in_exactly_one_folder(fake_spool):
    paths = [_drop(fake_spool, f"d{i % 3}/f{i}.dcm") for i in range(30)]
    for i, p in enumerate(paths):
        c = fake_spool.claim(p)
        if i % 2:
            fake_spool.finish(c, "sent" if i % 4 == 1 else "failed", {"reason": "r"})
    seen = {}
    for folder in ("inbox", "sending", "sent", "failed"):
        for f in fake_spool.files(folder):
            assert f.name not in seen, f"{f.name} in {seen.get(f.name)} and {folder}"
            seen[f.name] = folder
    assert len(seen) == 30


def test_unwritable_folder_is_refused(fs, monkeypatch):
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    s = Spool(Path("/spool/x"))
    s.prepare()
    monkeypatch.setattr(os, "access", lambda p, m: "failed" not in str(p))
    with pytest.raises(SpoolError, match="failed/ is not writable"):
        s.prepare()


def test_real_rename_noreplace_refuses_to_overwrite(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert a.read_text() == "a" and b.read_text() == "b"
    rename_noreplace(a, tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and not a.exists()


def test_real_spool_on_disk(tmp_path):
    s = Spool(tmp_path / "root")
    s.prepare()
    (s.inbox / "x.dcm").write_text("1")
    c = s.claim(s.inbox / "x.dcm")
    assert s.finish(c, "sent").read_text() == "1"
    assert renames.USE_RENAMEAT2


def test_crash_leftovers_in_failed_are_cleaned(fake_spool):
    done = fake_spool.finish(fake_spool.claim(_drop(fake_spool, "kept.dcm")), "failed", {"reason": "x"})
    (fake_spool.failed / ".relaypacs-y.dcm.error.json.123.tmp").write_text("{")  # killed mid-write
    (fake_spool.failed / "z.dcm.error.json").write_text("{}")  # sidecar written, file not moved yet
    removed = {p.name for p in fake_spool.clean_after_crash()}
    assert removed == {".relaypacs-y.dcm.error.json.123.tmp", "z.dcm.error.json"}
    assert done.exists() and sidecar_path(done).exists()


def test_real_spool_subfolders_collisions_and_sidecars(tmp_path):
    """On the real disk (renameat2): the first file of a subfolder creates it, a taken name gets ~1,
    and a failed file's name skips one whose stale sidecar is still there."""
    s = Spool(tmp_path / "root")
    s.prepare()
    for data in ("1", "2"):
        _drop(s, "study/a.dcm", data)
        c = s.claim(s.inbox / "study" / "a.dcm")
        assert c == s.sending / "study" / "a.dcm"
        s.finish(c, "sent")
    assert {p.name: p.read_text() for p in (s.sent / "study").iterdir()} == {"a.dcm": "1", "a~1.dcm": "2"}
    (s.failed / "other").mkdir()
    sidecar_path(s.failed / "other" / "b.dcm").write_text("{}")  # left by an earlier file
    _drop(s, "other/b.dcm")
    moved = s.finish(s.claim(s.inbox / "other" / "b.dcm"), "failed", {"reason": "bad"})
    assert moved.name == "b~1.dcm" and read_sidecar(moved)["reason"] == "bad"


@pytest.mark.parametrize("rel", ["inbox/a.dcm", "sending/x/y.dcm", "failed/b.dcm"])
def test_relative_strips_the_folder(rel):
    s = Spool(Path("/spool/ct"))
    assert s.relative(Path("/spool/ct") / rel) == Path(*Path(rel).parts[1:])
    assert s.relative_text(Path("/spool/ct") / rel) == str(Path(*Path(rel).parts[1:]))  # records, log lines
    assert s.relative_text(Path("/spool/ct/inbox")) == "."


@pytest.mark.parametrize("path", ["/spool/ct/inboxx/a.dcm", "/spool/other/inbox/a.dcm", "/spool/ct/a.dcm"])
def test_relative_refuses_paths_outside_the_folders(path):
    with pytest.raises(ValueError):
        Spool(Path("/spool/ct")).relative(Path(path))


def test_two_threads_failing_files_onto_one_free_name_each_keep_their_own_sidecar(tmp_path, monkeypatch):
    """failed/img.dcm is taken; sending/img.dcm and sending/img~1.dcm both look for failed/img~1.dcm.
    Unserialised, both wrote the sidecar there and the loser's cleanup removed the winner's."""
    s = Spool(tmp_path)
    s.prepare()
    (s.failed / "img.dcm").write_bytes(b"old")
    for name in ("img.dcm", "img~1.dcm"):
        (s.sending / name).write_bytes(name.encode())
    real_reserve = renames.free_name

    def slow_reserve(dest):  # both threads pick a name before either writes its sidecar
        name = real_reserve(dest)
        time.sleep(0.2)
        return name

    monkeypatch.setattr(renames, "free_name", slow_reserve)
    threads = [threading.Thread(target=s.finish, args=(s.sending / name, "failed", {"reason": f"bad {name}"}))
               for name in ("img.dcm", "img~1.dcm")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    failed = sorted(p for p in s.files("failed") if p.name != "img.dcm" or p.read_bytes() != b"old")
    assert len(failed) == 2
    for path in failed:  # each file's sidecar is there and tells its own story
        assert read_sidecar(path)["reason"] == f"bad {path.read_bytes().decode()}"


def test_namesakes_find_a_file_and_the_names_a_clash_gave_its_namesakes(tmp_path):
    from relaypacsd.names import Namesakes

    for name in ("a.dcm", "a~1.dcm", "a~12.dcm", "a.b~1.dcm", "ab.dcm", "scan~5.dcm", "NOSUFFIX~2", "x[1].dcm"):
        (tmp_path / name).write_bytes(b"x")
    names = Namesakes()
    assert [p.name for p in names.of(tmp_path / "a.dcm")] == ["a.dcm", "a~1.dcm", "a~12.dcm"]
    assert [p.name for p in names.of(tmp_path / "a.b.dcm")] == ["a.b~1.dcm"]
    assert [p.name for p in names.of(tmp_path / "scan~5.dcm")] == ["scan~5.dcm"]  # its own name, kept
    assert [p.name for p in names.of(tmp_path / "NOSUFFIX")] == ["NOSUFFIX~2"]
    assert [p.name for p in names.of(tmp_path / "x[1].dcm")] == ["x[1].dcm"]
    assert names.of(tmp_path / "missing" / "a.dcm") == []


def test_oldest_waiting_counts_from_the_arrival_not_from_a_copied_mtime(tmp_path):
    """`cp -p` / `rsync -a` keep the original mtime (30 days ago here); the file has waited seconds. This
    also checks what the age relies on: a rename sets the inode's ctime on this filesystem."""
    s = Spool(tmp_path / "root")
    s.prepare()
    copy = tmp_path / "img.dcm"
    copy.write_bytes(b"x")
    month_ago = time.time() - 30 * 86400
    os.utime(copy, (month_ago, month_ago))
    time.sleep(1.1)  # so that only the rename can explain a fresh ctime
    os.rename(copy, s.inbox / "img.dcm")
    assert spool_mod.age_seconds(s.inbox / "img.dcm") < 1.0
    counts, oldest = s.stats()
    assert counts["inbox"] == 1 and oldest is not None and oldest < 60
    s.claim(s.inbox / "img.dcm")
    counts, oldest = s.stats()
    assert counts["sending"] == 1 and oldest is not None and oldest < 60
    assert spool_mod.age_seconds(tmp_path / "gone.dcm") is None


def test_walk_finds_what_files_finds_without_listing_a_folder(tmp_path):
    """walk() is files() in directory order, one entry at a time (a million files in a flat sending/, #14)."""
    spool = Spool(tmp_path / "root")
    spool.prepare()
    for rel in ("a.dcm", "s1/b.dcm", "s1/s2/c.dcm", "s3/d.dcm"):
        (spool.sending / rel).parent.mkdir(parents=True, exist_ok=True)
        (spool.sending / rel).write_bytes(b"x")
    (spool.sending / "a.dcm.error.json").write_text("{}")
    (spool.sending / ".relaypacs-tmp").write_text("")
    (spool.sending / "empty").mkdir()
    (spool.sending / "link").symlink_to(spool.sending / "s1")  # a link to a folder is not followed
    assert sorted(spool.walk("sending")) == list(spool.files("sending"))
    assert spool.empty_folders("sending") == [spool.sending / "empty"]


@pytest.mark.parametrize("use_renameat2", [False, True])
@pytest.mark.parametrize("finished_in", ["sent", "failed"])
def test_an_inbox_name_left_by_a_claim_stopped_halfway_is_not_claimed_again(tmp_path, monkeypatch, use_renameat2,
                                                                            finished_in):
    """A node paused between its claim's link and unlink (a share without renameat2) left inbox/S1/a.dcm beside
    sending/S1/a.dcm; another node took the file over and finished it. Claimed again, it was sent twice and
    stood in sent/ as a.dcm and a~1.dcm. The claiming node may reach the share with renameat2 or without."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", use_renameat2 and renames.USE_RENAMEAT2)
    s = Spool(tmp_path / "root")
    s.prepare()
    done = s.root / finished_in / "S1" / "a.dcm"
    done.parent.mkdir()
    done.write_text("1")
    _drop(s, "S1/b.dcm", "2")
    os.link(done, s.inbox / "S1" / "a.dcm")
    with pytest.raises(AlreadyFinished, match="S1/a.dcm in inbox/ was a second name"):
        s.claim(s.inbox / "S1" / "a.dcm")
    assert s.claim(s.inbox / "S1" / "b.dcm") == s.sending / "S1" / "b.dcm"  # a plain file is claimed as ever
    assert not (s.inbox / "S1" / "a.dcm").exists() and not (s.sending / "S1" / "a.dcm").exists()
    assert done.read_text() == "1" and os.stat(done).st_nlink == 1


def test_a_hard_linked_file_whose_twin_is_elsewhere_is_claimed(tmp_path):
    """A modality or a script that hard-links its files into inbox/ (nlink 2, the twin outside the spool)."""
    s = Spool(tmp_path / "root")
    s.prepare()
    (tmp_path / "archive.dcm").write_text("1")
    os.link(tmp_path / "archive.dcm", s.inbox / "a.dcm")
    assert s.claim(s.inbox / "a.dcm") == s.sending / "a.dcm"


def test_start_up_finishes_moves_stopped_between_link_and_unlink(tmp_path):
    """Each leftover keeps the name of the later folder: inbox/+sending/ -> sending/; sending/+sent/ -> sent/;
    sending/+failed/ -> failed/. A file that merely has a link elsewhere stays."""
    s = Spool(tmp_path / "root")
    s.prepare()
    for name, later in (("claimed.dcm", "inbox"), ("sent.dcm", "sent"), ("failed.dcm", "failed")):
        (s.sending / name).write_text(name)
        os.link(s.sending / name, s.root / later / name)
    (tmp_path / "outside.dcm").write_text("o")
    os.link(tmp_path / "outside.dcm", s.sending / "outside.dcm")
    removed = sorted(p.relative_to(s.root).as_posix() for p in s.finish_interrupted_moves())
    assert removed == ["inbox/claimed.dcm", "sending/failed.dcm", "sending/sent.dcm"]
    assert sorted(p.name for p in s.sending.iterdir()) == ["claimed.dcm", "outside.dcm"]
    assert (s.sent / "sent.dcm").exists() and (s.failed / "failed.dcm").exists()
