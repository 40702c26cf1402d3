"""Emptied study folders: one mark per folder, the latest time wins, a prune removes only quiet ones."""

import os
import time
from pathlib import Path

from relaypacsd.folders import FOLDER_QUIET, EmptiedFolders
from relaypacsd.spool import Spool


def _emptied_study(tmp_path: Path) -> tuple[Spool, Path]:
    spool = Spool(tmp_path / "root")
    spool.prepare()
    study = spool.sending / "study"
    study.mkdir()
    old = time.time() - 10 * FOLDER_QUIET  # its mtime says quiet: only the marks' times can keep it
    os.utime(study, (old, old))
    return spool, study


def test_a_later_mark_of_the_same_folder_wins_whatever_path_object_names_it(tmp_path):
    spool, study = _emptied_study(tmp_path)
    folders = EmptiedFolders({})
    now = time.monotonic()
    folders.mark(spool, study, since=now - 10 * FOLDER_QUIET)
    folders.mark(spool, Path(str(study)), since=now)  # emptied again just now, named by another Path
    folders.mark(spool, study, since=now - 10 * FOLDER_QUIET)  # an older time does not win
    folders.prune()
    assert study.is_dir() and folders.marked(spool, study)  # too recently emptied: kept, and looked at again


def test_a_folder_marked_long_ago_goes_at_the_prune(tmp_path):
    spool, study = _emptied_study(tmp_path)
    folders = EmptiedFolders({})
    folders.mark(spool, study, since=time.monotonic() - 10 * FOLDER_QUIET)
    assert folders.marked(spool, study)
    folders.prune()
    assert not study.exists() and not folders.marked(spool, study)
    assert spool.sending.is_dir()  # never one of the four folders
