"""Issue #9: no file stays in sending/ for ever, on a real disk and through the in-process daemon.

Odd names, folder names a file holds, names too long to clash, zips with a file and a folder of one name,
files changed or deleted in sending/ after validation, emptied study folders, rows of deleted failures."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import pytest
from loguru import logger

from relaypacsd import archive
from relaypacsd import renames
from relaypacsd import spool as spool_mod
from relaypacsd.dicomweb import StowBody
from relaypacsd.errors import PacsUnreachable
from relaypacsd.journal import open_journal
from relaypacsd.renames import rename_noreplace
from relaypacsd.sidecars import SIDECAR_SUFFIX, read_sidecar, write_sidecar
from tests.dicomfactory import MR_SMALL, write_instance
from tests.helpers import ScriptedPacs, count, make_daemon, wait_until

NAME_MAX = 255


class ReadingPacs(ScriptedPacs):
    """A ScriptedPacs that reads each file as STOW-RS does (StowBody: the size validated, then the bytes)."""

    def __init__(self, name):
        super().__init__(name)
        self.bodies: list[bytes] = []

    def send(self, parts):
        self.bodies.append(b"".join(bytes(c) for c in StowBody(parts, "b")))  # raises PartChanged / OSError like a real request
        return super().send(parts)


def _rows(tmp_path) -> int:
    journal = open_journal(tmp_path / "state")
    try:
        return sum(sum(v.values()) for v in journal.counts().values())
    finally:
        journal.close()


def _run(daemon, until, timeout=10):
    daemon.start()
    try:
        return wait_until(until, timeout=timeout)
    finally:
        daemon.shutdown(timeout=5)


# -- item 2: never stuck in sending/ -------------------------------------------------------------------


def test_a_name_that_is_not_utf8_is_claimed_under_its_cp1252_name_and_delivered(tmp_path):
    """Latin-1 bytes from an SMB client, in the folder and the file name: SQLite refused the path, and the
    file was retried in sending/ every sweep, for ever."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    raw = Path(os.fsdecode(os.fsencode(spool.inbox) + b"/CT\xe9/IM\xe90001.dcm"))  # "CTé/IMé0001.dcm" in cp1252
    sop = write_instance(raw)
    left = Path(os.fsdecode(os.fsencode(spool.sending) + b"/old\x9d.dcm"))  # an older run's; 0x9D: not cp1252
    sop2 = write_instance(left)
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}", level="INFO")
    try:
        assert _run(daemon, lambda: count(spool, "sent") == 2)
    finally:
        logger.remove(sink)
    named = [line for line in lines if "not valid UTF-8" in line]
    assert len(named) == 2 and "CT\\xe9/IM\\xe90001.dcm" in named[0] + named[1]  # once each, escaped
    assert all(line.encode("utf-8") for line in lines)  # every line is valid UTF-8 from here on
    assert (spool.sent / "CTé" / "IMé0001.dcm").exists() and (spool.sent / "old\x9d.dcm").exists()
    assert pacs.received(sop) == 1 and pacs.received(sop2) == 1
    assert count(spool, "sending") == 0 and _rows(tmp_path) == 0


def test_a_folder_name_that_a_file_holds_in_sent_or_failed_gives_a_free_folder(tmp_path):
    """sent/CT1 is a file, then inbox/CT1/IM0001 arrives: the move to sent/CT1/IM0001 failed with ENOTDIR
    every sweep."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    (spool.sent / "CT1").write_bytes(b"an old file")
    (spool.failed / "CT2").write_bytes(b"an old failure")
    sop = write_instance(spool.inbox / "CT1" / "IM0001.dcm")
    (spool.inbox / "CT2").mkdir()
    (spool.inbox / "CT2" / "bad.dcm").write_bytes(b"not dicom at all" * 20)
    assert _run(daemon, lambda: count(spool, "sent") == 2 and count(spool, "failed") == 2)
    assert (spool.sent / "CT1~1" / "IM0001.dcm").exists() and pacs.received(sop) == 1
    assert (spool.failed / "CT2~1" / "bad.dcm").exists() and read_sidecar(spool.failed / "CT2~1" / "bad.dcm")
    assert (spool.sent / "CT1").read_bytes() == b"an old file" and count(spool, "sending") == 0


def test_a_255_byte_name_that_clashes_gets_a_shortened_free_name(tmp_path):
    """A name of NAME_MAX bytes whose ~1 name is too long (ENAMETOOLONG): now cut, suffix and ~N kept; a
    failed one gets a name whose sidecar fits."""
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    name = "é" * 125 + "x.dcm"  # 250 + 5 bytes in UTF-8
    assert len(name.encode()) == NAME_MAX
    (spool.sent / name).write_bytes(b"delivered last week")
    sop = write_instance(spool.inbox / name)
    bad = "b" * 251 + ".dcm"
    (spool.inbox / bad).write_bytes(b"not dicom" * 30)
    assert _run(daemon, lambda: count(spool, "sent") == 2 and count(spool, "failed") == 1)
    (new,) = [p for p in spool.files("sent") if p.name != name]
    assert new.name.endswith("~1.dcm") and len(new.name.encode()) <= NAME_MAX and pacs.received(sop) == 1
    (failed,) = spool.files("failed")
    assert failed.name.endswith(".dcm") and read_sidecar(failed)["stage"] == "validation"
    assert len((failed.name + SIDECAR_SUFFIX).encode()) <= NAME_MAX and count(spool, "sending") == 0


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in entries:
            zf.writestr(entry, data)
    return path


def test_a_zip_with_a_file_and_a_folder_of_one_name_fails_once(tmp_path, monkeypatch):
    """S1 and S1/IM2 in one zip: FileExistsError escaped the BadArchive handling and the zip was unpacked
    again at every sweep. Now failed/ with a reason, in either order, unpacked once."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    write_instance(tmp_path / "a.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    _zip(tmp_path / "file-first.zip", [("S1", data), ("S1/IM2", data)])
    _zip(tmp_path / "folder-first.zip", [("S1/IM2", data), ("S1", data)])
    unpacks = []
    real_unpack = archive.unpack
    monkeypatch.setattr(archive, "unpack", lambda *a, **k: unpacks.append(a[0].name) or real_unpack(*a, **k))
    for name in ("file-first.zip", "folder-first.zip"):
        os.replace(tmp_path / name, spool.inbox / name)
    assert _run(daemon, lambda: count(spool, "failed") == 2)
    for name in ("file-first.zip", "folder-first.zip"):
        assert "the archive also has a" in read_sidecar(spool.failed / name)["reason"]
    assert sorted(unpacks) == ["file-first.zip", "folder-first.zip"]  # once each
    assert count(spool, "sending") == 0 and not list(spool.root.glob(".relaypacs-unzip-*"))


def test_the_check_then_rename_fallback_never_overwrites(tmp_path, monkeypatch):
    """Where renameat2(RENAME_NOREPLACE) fails (NFS: EINVAL), the fallback must still refuse a taken name:
    with link(2), atomically; where hard links are refused too, by the check."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):  # never an overwrite
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_text() == "a" and (tmp_path / "b").read_text() == "b"
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert not (tmp_path / "a").exists() and (tmp_path / "c").read_text() == "a"
    assert os.stat(tmp_path / "c").st_nlink == 1  # one name left: the old one went
    # A race the check cannot see: the name is taken between the look and the link. link(2) refuses it.
    real_lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda p: False if str(p).endswith("/d") else real_lexists(p))
    (tmp_path / "d").write_text("d")
    with pytest.raises(FileExistsError):  # never an overwrite
        rename_noreplace(tmp_path / "c", tmp_path / "d")
    assert (tmp_path / "d").read_text() == "d" and (tmp_path / "c").read_text() == "a"
    # A folder (an unpack's temp folder) cannot be hard-linked: the check-then-rename still refuses.
    (tmp_path / "dir1").mkdir()
    (tmp_path / "dir2").mkdir()
    monkeypatch.setattr(os.path, "lexists", real_lexists)
    with pytest.raises(FileExistsError):  # never an overwrite
        rename_noreplace(tmp_path / "dir1", tmp_path / "dir2")
    rename_noreplace(tmp_path / "dir1", tmp_path / "dir3")
    assert (tmp_path / "dir3").is_dir()


def test_the_fallback_survives_an_nfs_retried_link_and_filesystems_without_hard_links(tmp_path, monkeypatch):
    """NFS may retry a LINK that succeeded and answer EEXIST: the same inode is ours, the move is done. Where
    link(2) is refused (EPERM: some CIFS, protected_hardlinks), check-then-rename, still no overwrite."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    real_link = os.link

    def retried_link(src, dst, **kwargs):
        real_link(src, dst, **kwargs)
        raise FileExistsError(17, "File exists", str(dst))

    (tmp_path / "a").write_text("a")
    monkeypatch.setattr(os, "link", retried_link)
    rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a").exists() and (tmp_path / "b").read_text() == "a"

    def no_links(src, dst, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "c").write_text("c")
    with pytest.raises(FileExistsError):  # never an overwrite
        rename_noreplace(tmp_path / "c", tmp_path / "b")
    rename_noreplace(tmp_path / "c", tmp_path / "d")
    assert (tmp_path / "b").read_text() == "a" and (tmp_path / "d").read_text() == "c" and not (tmp_path / "c").exists()


def test_whole_daemon_on_the_fallback_rename_delivers_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    (spool.sent / "img.dcm").write_bytes(b"the old one")
    sop = write_instance(spool.inbox / "img.dcm")
    assert _run(daemon, lambda: count(spool, "sent") == 2)
    assert (spool.sent / "img.dcm").read_bytes() == b"the old one" and (spool.sent / "img~1.dcm").exists()
    assert pacs.received(sop) == 1


def test_a_fallback_move_whose_old_name_cannot_go_leaves_the_file_in_one_folder(tmp_path, monkeypatch):
    """link(2) needs no write access to the folder the file leaves, unlink(2) does (a modality's folder the
    service user may read only): the link made sending/img.dcm, the unlink failed, and the file stood in both
    folders: sent from sending/ by the sweep, linked again at the next rescan, and sent again, for ever."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    path = spool.inbox / "S1" / "img.dcm"
    write_instance(path)
    real_unlink = os.unlink

    def refused(p, *args, **kwargs):
        if str(p).startswith(str(spool.inbox)):
            raise PermissionError(13, "Permission denied", str(p))
        return real_unlink(p, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refused)
    try:
        assert daemon.scanners[0].claim(path) is None  # logged, and left in inbox/ for the next rescan
        assert path.exists() and count(spool, "sending") == 0 and os.stat(path).st_nlink == 1
    finally:
        daemon.journal.close()


# -- item 3: a file changed or deleted in sending/ after validation -----------------------------------------


def _held(tmp_path):
    """A daemon whose PACS is down at start, so validated files wait in sending/ unsent."""
    pacs = ReadingPacs("orthanc")
    pacs.probe_error = PacsUnreachable("PACS 'orthanc' unreachable: test")
    daemon = make_daemon(tmp_path, pacs)
    return pacs, daemon, daemon.spools[0], daemon.engine.destinations["orthanc"]


def _validated_while_down(daemon, dest, name):
    """Drop `name` into the inbox of a started `_held` daemon; return its SOP UID and its sending/ path once
    validated (tracked by the engine, unsent: the PACS is down)."""
    spool = daemon.spools[0]
    assert wait_until(lambda: not dest.healthy)
    sop = write_instance(spool.inbox / name)
    path = spool.sending / name
    assert wait_until(lambda: daemon.engine.known(path))
    return sop, path


def _bring_back(daemon, pacs):
    pacs.probe_error = None
    daemon.engine.probe()


def test_a_file_rewritten_in_sending_after_validation_is_validated_again_and_delivered(tmp_path):
    pacs, daemon, spool, dest = _held(tmp_path)
    daemon.start()
    try:
        old_sop, path = _validated_while_down(daemon, dest, "img.dcm")
        new_sop = write_instance(path, MR_SMALL)  # another size: rewritten by someone after validation
        _bring_back(daemon, pacs)
        assert wait_until(lambda: count(spool, "sent") == 1)
    finally:
        daemon.shutdown(timeout=5)
    assert pacs.received(new_sop) == 1 and pacs.received(old_sop) == 0
    assert (spool.sent / "img.dcm").read_bytes() in pacs.bodies[-1]  # what was sent is what sits in sent/
    assert _rows(tmp_path) == 0


def test_a_file_rewritten_invalid_in_sending_fails_with_a_reason(tmp_path):
    pacs, daemon, spool, dest = _held(tmp_path)
    daemon.start()
    try:
        _sop, path = _validated_while_down(daemon, dest, "img.dcm")
        path.write_bytes(b"garbage now" * 10)
        _bring_back(daemon, pacs)
        assert wait_until(lambda: count(spool, "failed") == 1)
    finally:
        daemon.shutdown(timeout=5)
    assert read_sidecar(spool.failed / "img.dcm")["stage"] == "validation" and pacs.calls == []


def test_a_file_deleted_from_sending_after_validation_is_forgotten_not_retried(tmp_path):
    pacs, daemon, spool, dest = _held(tmp_path)
    daemon.start()
    try:
        _sop, path = _validated_while_down(daemon, dest, "gone.dcm")
        keep, _kept = _validated_while_down(daemon, dest, "keep.dcm")
        path.unlink()
        _bring_back(daemon, pacs)
        assert wait_until(lambda: count(spool, "sent") == 1)
        time.sleep(0.3)
        assert daemon.engine.in_flight() == 0
        calls = len(pacs.calls)
        daemon.engine.sweep()
        daemon.engine.destinations["orthanc"].release_due(everything=True)
        time.sleep(0.3)
        assert len(pacs.calls) == calls  # nothing left to send: no endless retries
    finally:
        daemon.shutdown(timeout=5)
    assert pacs.received(keep) == 1 and (spool.sent / "keep.dcm").exists() and _rows(tmp_path) == 0


# -- item 14: emptied folders, rows of deleted failures -----------------------------------------------------


def test_emptied_study_folders_are_removed_once_quiet_never_the_four_folders(tmp_path, monkeypatch):
    monkeypatch.setattr("relaypacsd.folders.FOLDER_QUIET", 0.1)  # 60 s in service; the settle time here
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    (spool.inbox / "old-empty" / "series").mkdir(parents=True)  # left by an earlier run
    past = time.time() - 60
    os.utime(spool.inbox / "old-empty" / "series", (past, past))
    os.utime(spool.inbox / "old-empty", (past, past))
    daemon.start()
    try:
        assert not (spool.inbox / "old-empty").exists()  # start-up removed it
        for i in range(3):
            write_instance(spool.inbox / f"study{i}" / "series" / "img.dcm")
        assert wait_until(lambda: count(spool, "sent") == 3)
        fresh = spool.inbox / "just-made"
        fresh.mkdir()  # a writer that is about to create its file here
        daemon._may_be_empty(spool, fresh)
        daemon._recover()
        assert fresh.is_dir()  # younger than the settle time: kept
        time.sleep(0.2)  # the settle time (0.1 s) passes
        for _ in range(4):  # one level per sweep at most: a parent's mtime changes when its child goes
            daemon._recover()
            time.sleep(0.15)
        assert not any(spool.sending.iterdir()) and not any(spool.inbox.iterdir())
    finally:
        daemon.shutdown(timeout=5)
    assert all((spool.root / f).is_dir() for f in spool_mod.FOLDERS)


def test_rows_of_files_deleted_from_failed_go_after_two_looks(tmp_path):
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    kept = spool.failed / "kept.dcm"
    kept.write_bytes(b"x")
    write_sidecar(kept, {"reason": "refused"})
    deleted = spool.failed / "deleted.dcm"
    for key in (kept, deleted):
        daemon.journal.ensure(str(key), ["orthanc"], sop="1.2.3")
    daemon.start()
    try:
        assert daemon.journal.rows(str(deleted))  # one look is no proof (a share not mounted yet)
        daemon.deleted_failures.next_look = 0.0
        daemon._recover()  # the hourly look
        assert daemon.journal.rows(str(deleted)) == {} and daemon.journal.rows(str(kept))
    finally:
        daemon.shutdown(timeout=5)


# -- item 12: a validation refusal says what refused it ---------------------------------------------------


def test_a_validation_refusal_says_validation_not_pacs_forward(tmp_path):
    """No PACS saw the file: "PACS forward rejected" sent technicians to the PACS's logs."""
    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    (spool.sending / "bad.dcm").write_bytes(b"not dicom" * 30)
    zipped = spool.sending / "bad.zip"
    zipped.write_bytes(b"PK\x03\x04 but no archive after it")
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}", level="INFO")
    try:
        daemon._validate(spool, spool.sending / "bad.dcm")
        daemon._validate(spool, zipped)
    finally:
        logger.remove(sink)
        daemon.journal.close()
    refusals = [line for line in lines if "refused" in line]
    assert len(refusals) == 2 and not [line for line in lines if "PACS forward" in line], lines
    assert refusals[0].startswith("validation refused bad.dcm: ") and "(moved to failed/bad.dcm)" in refusals[0]
    assert refusals[1].startswith("validation refused archive bad.zip: ") and "(moved to failed/bad.zip)" in refusals[1]


def test_folders_emptied_just_before_a_start_or_reload_still_go_once_quiet(tmp_path, monkeypatch):
    """Start-up removes the empty folders that are quiet already; one emptied just before (a restart, a reload
    right after a study was claimed) must go at a later sweep, not stay until the next restart."""
    monkeypatch.setattr("relaypacsd.folders.FOLDER_QUIET", 0.5)
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    (spool.inbox / "young").mkdir()  # emptied by the previous run a moment ago
    daemon.start()
    try:
        write_instance(spool.inbox / "study" / "img.dcm")
        assert wait_until(lambda: count(spool, "sent") == 1)
        daemon._stop_pieces(timeout=5)  # what reload() does, at once after the claim
        daemon._build(daemon.config)
        daemon.start()
        assert (spool.inbox / "young").is_dir() and (spool.inbox / "study").is_dir()  # not quiet yet: kept
        time.sleep(0.7)
        daemon._recover()  # a sweep
        assert not (spool.inbox / "young").exists() and not any(spool.inbox.iterdir())
        assert not any(spool.sending.iterdir())
    finally:
        daemon.shutdown(timeout=5)


def test_the_folder_a_non_utf8_name_leaves_in_sending_goes_once_quiet(tmp_path, monkeypatch):
    """A file an older run left in sending/CT\\xe9/ is renamed to sending/CTé/ at validation: the folder it
    leaves is emptied like one a claim or a delivery empties, and must go too."""
    monkeypatch.setattr("relaypacsd.folders.FOLDER_QUIET", 0.1)
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    old = Path(os.fsdecode(os.fsencode(spool.sending) + b"/CT\xe9/old.dcm"))
    write_instance(old)
    daemon.start()
    try:
        assert wait_until(lambda: count(spool, "sent") == 1)
        time.sleep(0.2)
        for _ in range(2):  # sweeps
            daemon._recover()
            time.sleep(0.15)
        assert not any(spool.sending.iterdir())
    finally:
        daemon.shutdown(timeout=5)


def test_a_claim_killed_between_its_link_and_its_unlink_is_finished_at_start_not_sent_twice(tmp_path, monkeypatch):
    """The link fallback (NFS) moves by link(2) then unlink(2): killed in between, one file has two names,
    inbox/ and sending/. Start-up sent the one in sending/, then claimed the other and sent it again."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    sop = write_instance(spool.sending / "S1" / "img.dcm")
    (spool.inbox / "S1").mkdir()
    os.link(spool.sending / "S1" / "img.dcm", spool.inbox / "S1" / "img.dcm")  # what the killed claim left
    daemon.start()
    try:
        assert wait_until(lambda: count(spool, "sent") == 1)
        time.sleep(1.0)  # settle 0.1 s: a claim of the inbox/ name would have been sent by now
        assert count(spool, "sent") == 1 and pacs.received(sop) == 1 and count(spool, "inbox") == 0
    finally:
        daemon.shutdown(timeout=5)


def test_an_inbox_name_of_a_file_already_sent_is_dropped_not_sent_again(tmp_path, monkeypatch):
    """Another gateway paused mid-claim (link made, unlink not yet) while this one sent the file: the inbox/
    name left beside sent/ was claimed, sent a second time, and kept in sent/ as img~1.dcm."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    write_instance(spool.sent / "S1" / "img.dcm")
    daemon.start()
    try:
        (spool.inbox / "S1").mkdir()
        os.link(spool.sent / "S1" / "img.dcm", spool.inbox / "S1" / "img.dcm")
        assert wait_until(lambda: count(spool, "inbox") == 0)
        time.sleep(0.5)
        assert count(spool, "sent") == 1 and count(spool, "sending") == 0 and not pacs.calls
        assert os.stat(spool.sent / "S1" / "img.dcm").st_nlink == 1
    finally:
        daemon.shutdown(timeout=5)


def test_a_move_to_failed_killed_between_its_link_and_its_unlink_leaves_one_failure(tmp_path, monkeypatch):
    """Killed after the link fallback made failed/bad.dcm (its sidecar beside it) but before sending/bad.dcm
    went: the next run failed it again beside itself, bad~1.dcm, one file shown as two failures."""
    monkeypatch.setattr(renames, "USE_RENAMEAT2", False)
    pacs = ScriptedPacs("orthanc")
    daemon = make_daemon(tmp_path, pacs)
    spool = daemon.spools[0]
    spool.prepare()
    (spool.sending / "bad.dcm").write_bytes(b"not dicom at all" * 20)
    write_sidecar(spool.failed / "bad.dcm", {"reason": "not DICOM", "stage": "validation"})
    os.link(spool.sending / "bad.dcm", spool.failed / "bad.dcm")  # what the killed run left
    assert _run(daemon, lambda: count(spool, "sending") == 0)
    assert [p.name for p in spool.files("failed")] == ["bad.dcm"] and read_sidecar(spool.failed / "bad.dcm")
    assert os.stat(spool.failed / "bad.dcm").st_nlink == 1
    assert sorted(p.name for p in spool.failed.iterdir()) == ["bad.dcm", "bad.dcm" + SIDECAR_SUFFIX]


def test_every_refusal_is_in_the_delivery_history_without_a_pacs(tmp_path):
    """Junk, an instance without a required UID, a DICOMDIR, a bad archive: each refused before any PACS saw
    it, each with its stage in the record's reason and whatever identifies it."""
    from relaypacsd.history import HistoryQuery
    from tests.dicomfactory import DICOMDIR, fresh

    daemon = make_daemon(tmp_path, ScriptedPacs("orthanc"))
    spool = daemon.spools[0]
    spool.prepare()
    (spool.sending / "bad.dcm").write_bytes(b"not dicom" * 30)
    ds = fresh()
    del ds.SeriesInstanceUID
    ds.PatientID = "P-77"
    (spool.sending / "CT1").mkdir()
    ds.save_as(spool.sending / "CT1" / "noseries.dcm", enforce_file_format=True)
    (spool.sending / "DICOMDIR").write_bytes(DICOMDIR.read_bytes())
    (spool.sending / "bad.zip").write_bytes(b"PK\x03\x04 but no archive after it")
    try:
        for name in ("bad.dcm", "CT1/noseries.dcm", "DICOMDIR", "bad.zip"):
            daemon._validate(spool, spool.sending / name)
        found = {r.file: r for r in daemon.journal.find_history(HistoryQuery())}
    finally:
        daemon.journal.close()
    assert set(found) == {"bad.dcm", "CT1/noseries.dcm", "DICOMDIR", "bad.zip"}
    assert {(r.outcome, r.destination, r.watch) for r in found.values()} == {("refused", "", str(spool.root))}
    assert found["bad.dcm"].reason.startswith("validation: not a DICOM file")
    assert found["DICOMDIR"].reason.startswith("dicomdir: ") and found["bad.zip"].reason.startswith("archive: ")
    noseries = found["CT1/noseries.dcm"]
    assert "SeriesInstanceUID is missing" in noseries.reason and noseries.reason.startswith("validation: ")
    assert (noseries.sop_instance_uid, noseries.patient_id, noseries.modality) == (ds.SOPInstanceUID, "P-77", "CT")
