"""Retention of the delivery history: the oldest records go in small steps, never in one long commit."""

from __future__ import annotations

import threading
import time

from relaypacsd import retention
from relaypacsd.config import build_config
from relaypacsd.daemon import Daemon
from relaypacsd.history import HistoryQuery, HistoryRecord
from relaypacsd.journal import open_journal

DAY = 86400.0


def _journal_with(tmp_path, ages_days):
    journal = open_journal(tmp_path)
    now = time.time()
    journal.record_history([HistoryRecord(now - a * DAY, file=f"{a}") for a in ages_days])
    return journal


class Counting:
    """A journal whose prune_history calls are counted (the steps)."""

    def __init__(self, journal):
        self.journal, self.steps = journal, []

    def prune_history(self, before, limit):
        went = self.journal.prune_history(before, limit)
        self.steps.append(went)
        return went


def test_records_older_than_the_days_go_in_steps_the_rest_stays(tmp_path):
    journal = _journal_with(tmp_path, [400] * 7 + [366, 364, 10])
    counting = Counting(journal)
    try:
        assert retention.prune_history(counting, 365, threading.Event(), step=3, pause=0) == 8
        assert counting.steps == [3, 3, 2]  # a step that took less than its limit was the last
        assert [r.file for r in journal.find_history(HistoryQuery())] == ["10", "364"]
    finally:
        journal.close()


def test_zero_days_keeps_nothing(tmp_path):
    journal = _journal_with(tmp_path, [1, 0.01])
    try:
        assert retention.prune_history(journal, 0, threading.Event()) == 2
    finally:
        journal.close()


def test_a_run_ends_at_its_budget_or_at_the_stop_and_the_next_run_goes_on(tmp_path):
    journal = _journal_with(tmp_path, [500] * 10)
    counting = Counting(journal)
    try:
        assert retention.prune_history(counting, 365, threading.Event(), step=2, pause=0, budget=0) == 2
        stop = threading.Event()
        stop.set()
        assert retention.prune_history(counting, 365, stop, step=2, pause=0) == 0
        assert retention.prune_history(counting, 365, threading.Event(), step=2, pause=0) == 8
    finally:
        journal.close()


def test_a_closed_journal_stops_the_pruning_with_a_warning_not_an_error(tmp_path):
    journal = _journal_with(tmp_path, [500])
    journal.close()
    assert retention.prune_history(journal, 365, threading.Event()) == 0


def test_the_daemons_retention_job_prunes_the_history_even_without_sent_retention(tmp_path):
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")}, "watch": [{"path": str(tmp_path / "root")}],
                           "delivery": {"enabled": False, "history_days": 30}}, {})
    daemon = Daemon(config, senders={})
    now = time.time()
    daemon.journal.record_history([HistoryRecord(now - 31 * DAY, file="old"), HistoryRecord(now - DAY, file="new")])
    try:
        daemon._retention_job()
        assert [r.file for r in daemon.journal.find_history(HistoryQuery())] == ["new"]
    finally:
        daemon.journal.close()


def test_the_retention_job_is_scheduled_even_when_sent_files_are_kept_for_ever(tmp_path):
    from relaypacsd.jobs import Jobs

    config = build_config({"watch": [{"path": str(tmp_path)}], "delivery": {"sent_retention_days": 0}}, {})
    jobs = Jobs()
    jobs.start(config, *(lambda: None,) * 4)
    try:
        assert jobs.scheduler.get_job("retention") is not None
    finally:
        jobs.shutdown()
