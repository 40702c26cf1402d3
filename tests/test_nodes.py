"""relaypacsd.nodes and its parts: a node's lease on a real journal, the spool's node files, the journal's keys by
watch-root name, and the nodes as status and the metrics show them (#14). The several-daemons behaviour is in
tests/integration/test_gateways.py."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
from loguru import logger

from relaypacsd import nodes_spool
from relaypacsd.config import build_config
from relaypacsd.errors import JournalError, LeaseLost, NodeConflict
from relaypacsd.journal import JOURNAL_FILE, Update
from relaypacsd.journal_keys import KeyedJournal, RootKeys
from relaypacsd.journal_sqlite import SqliteJournal
from relaypacsd.nodes import Node, describe_nodes


def _config(tmp_path, **daemon):
    return build_config({"daemon": {"state_dir": str(tmp_path / "state"), "node": "gw-a", "heartbeat_interval": 0.5,
                                    "lease_seconds": 2, **daemon},
                         "watch": [{"path": str(tmp_path / "spool")}]}, {})


@pytest.fixture
def journal(tmp_path):
    j = SqliteJournal(tmp_path / "state" / JOURNAL_FILE)
    yield j
    j.close()


@pytest.fixture
def lines():
    found: list[str] = []
    sink = logger.add(lambda m: found.append(str(m).rstrip("\n")), level="INFO", format="{level} {message}")
    yield found
    logger.remove(sink)


class TestNode:
    def test_a_node_joins_fenced_and_usable(self, tmp_path, journal):
        node = Node(_config(tmp_path), journal)
        assert node.join() == 1 and node.usable() and not node.shared and node.grace == 0
        assert Node(_config(tmp_path), journal).join() == 2  # this process again (a reload): a new incarnation
        with pytest.raises(LeaseLost):  # the first incarnation is fenced out
            journal.fence("gw-a", 1)
            journal.apply([Update("/s/sending/a", "x", "failed", "failed")])

    def test_a_name_another_live_process_holds_is_refused_in_one_line(self, tmp_path, journal):
        journal.join("gw-a", "other-host", 4242, 0)
        with pytest.raises(NodeConflict) as exc:
            Node(_config(tmp_path), journal).join()
        assert "other-host" in str(exc.value) and "daemon.node" in str(exc.value) and "\n" not in str(exc.value)

    def test_a_crashed_run_on_this_host_or_a_silent_one_elsewhere_gives_its_name_back(self, tmp_path, journal):
        import socket
        import subprocess

        gone = subprocess.Popen(["true"])
        gone.wait()
        journal.join("gw-a", socket.gethostname(), gone.pid, 0)
        assert Node(_config(tmp_path), journal).join() == 2
        journal.join("gw-b", "far-away", 1, 0)
        time.sleep(2.1)
        assert Node(_config(tmp_path, node="gw-b"), journal).join() == 2

    def test_the_journal_away_is_said_once_and_back_once(self, tmp_path, journal, lines):
        node = Node(_config(tmp_path), journal)
        node.join()
        changes = []
        node.on_change = changes.append
        for _ in range(3):
            node.journal_failed(JournalError("/x/journal.sqlite3: disk I/O error"))
        assert not node.usable()
        node.beat({})
        assert node.usable() and changes == [False, True]
        away = [line for line in lines if "cannot be reached" in line]
        assert len(away) == 1 and "disk I/O error" in away[0] and "inbox/" in away[0]
        assert len([line for line in lines if "reachable again" in line]) == 1

    def test_a_lease_not_renewed_in_half_its_time_holds_moves_back(self, tmp_path, journal):
        clock = [100.0]
        node = Node(_config(tmp_path), journal, clock=lambda: clock[0])
        node.join()
        clock[0] += 0.9
        assert node.usable()
        clock[0] += 0.2  # 1.1 s: past half the 2 s lease
        assert not node.usable()
        stop = threading.Event()
        stop.set()
        assert node.wait_usable(stop) is False  # stopping: nothing moves without a fresh lease
        woken = []
        node.on_change = woken.append
        node.beat({})
        assert node.usable() and woken == [True] and node.wait_usable(stop) is True

    def test_a_node_taken_over_learns_it_at_its_next_beat_and_lets_go_once(self, tmp_path, journal, lines):
        node = Node(_config(tmp_path), journal)
        node.join()
        lost = []
        node.on_lost = lambda: lost.append(1)
        other = SqliteJournal(tmp_path / "state" / JOURNAL_FILE)
        try:
            other.join("gw-b", "h", 1, 0)
            time.sleep(2.1)
            assert other.take_over("gw-b", 1, 2) == {"gw-a": 0}
        finally:
            other.close()
        node.beat({})
        node.beat({})
        assert lost == [1] and node.lost.is_set() and not node.usable()
        said = [line for line in lines if "lost its lease" in line]
        assert len(said) == 1 and "node gw-b took its files over" in said[0]

    def test_alone_on_sqlite_every_untracked_file_is_ours_and_claims_need_no_reservation(self, tmp_path, journal):
        node = Node(_config(tmp_path), journal)
        node.join()
        paths = [tmp_path / "spool" / "sending" / f"{i}.dcm" for i in range(3)]
        assert node.mine(paths) == paths and node.reserve(paths) == set(paths)


def test_nodes_as_status_and_the_metrics_show_them(tmp_path, journal):
    journal.join("gw-a", "host-a", 1, 0)
    journal.beat("gw-a", 1, {"orthanc": {"healthy": False, "reason": "refused"}})
    journal.claimed("gw-a", [], ["/s/sending/1", "/s/sending/2"])
    journal.join("gw-b", "host-b", 2, 0)
    journal.leave("gw-b", 1)
    shown = {n["name"]: n for n in describe_nodes(journal.nodes(), 30)}
    assert (shown["gw-a"]["state"], shown["gw-a"]["files"], shown["gw-a"]["host"]) == ("alive", 2, "host-a")
    assert shown["gw-a"]["pacs"] == {"orthanc": {"healthy": False, "reason": "refused"}}
    assert shown["gw-b"]["state"] == "stopped" and shown["gw-a"]["heartbeat"].endswith("+00:00")

    from prometheus_client.parser import text_string_to_metric_families

    from relaypacsd.metrics import Metrics
    from relaypacsd.snapshot import Snapshot

    snap = Snapshot(time=0, version="x", uptime_seconds=0, ready=True, alive=True, in_flight=0, sent=0, failed=0,
                    roots=(), destinations=(), nodes=tuple(shown.values()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(Metrics(lambda: snap).render().decode()) for s in fam.samples}
    assert samples[("relaypacsd_node_up", (("host", "host-a"), ("node", "gw-a")))] == 1.0
    assert samples[("relaypacsd_node_up", (("host", "host-b"), ("node", "gw-b")))] == 0.0
    assert samples[("relaypacsd_node_files", (("node", "gw-a"),))] == 2.0
    assert samples[("relaypacsd_node_destination_up", (("node", "gw-a"), ("pacs", "orthanc")))] == 0.0


class TestSpoolMarkers:
    def _marker(self, node, journal_id="j1", shared=True, started=None, root_name="ct"):
        return nodes_spool.Marker(node=node, host="h", pid=1, journal=f"journal {journal_id}", journal_id=journal_id,
                                  shared=shared, started=time.time() if started is None else started,
                                  root_name=root_name)

    def test_a_second_gateway_with_another_journal_is_refused_naming_the_first(self, tmp_path):
        first = self._marker("gw-a", "sqlite-1", shared=False, started=time.time() - 100)
        nodes_spool.write_marker(tmp_path, first)
        for mine in (self._marker("gw-b", "sqlite-2", shared=False), self._marker("gw-b", "pg-1")):
            with pytest.raises(NodeConflict) as exc:
                nodes_spool.check_spool(tmp_path, mine, lease=30)
            text = str(exc.value)
            assert "served by node gw-a" in text and "PostgreSQL" in text and "\n" not in text
        nodes_spool.check_spool(tmp_path, first, lease=30)  # its own file is no obstacle

    def test_nodes_of_one_shared_journal_share_the_spool_under_one_name(self, tmp_path):
        nodes_spool.write_marker(tmp_path, self._marker("gw-a", started=time.time() - 100))
        nodes_spool.check_spool(tmp_path, self._marker("gw-b"), lease=30)
        with pytest.raises(NodeConflict, match="named 'other' here but node gw-a"):
            nodes_spool.check_spool(tmp_path, self._marker("gw-b", root_name="other"), lease=30)

    def test_of_two_starting_at_once_the_later_one_refuses_and_a_stale_file_is_no_one(self, tmp_path):
        early, late = self._marker("gw-a", "x", False, started=10.0), self._marker("gw-b", "y", False, started=11.0)
        nodes_spool.write_marker(tmp_path, early)
        nodes_spool.write_marker(tmp_path, late)
        nodes_spool.check_spool(tmp_path, early, lease=30)
        with pytest.raises(NodeConflict):
            nodes_spool.check_spool(tmp_path, late, lease=30)
        path = nodes_spool.marker_path(tmp_path, "gw-a")
        old = time.time() - 60
        body = path.read_text().replace('"time": ', '"time": 0, "was": ')
        path.write_text(body)
        os.utime(path, (old, old))
        nodes_spool.check_spool(tmp_path, late, lease=30)  # gw-a silent past the lease
        nodes_spool.remove_marker(tmp_path, "gw-b")
        assert not nodes_spool.marker_path(tmp_path, "gw-b").exists()


class TestRootKeys:
    def test_the_journal_keys_files_by_root_name_whatever_the_mount_path(self, tmp_path):
        here, there = RootKeys([("/mnt/pacs/ct", "ct")]), RootKeys([("/srv/share/ct/", "ct")])
        assert here.key("/mnt/pacs/ct/sending/CT1/a.dcm") == there.key("/srv/share/ct/sending/CT1/a.dcm") == \
            "ct/sending/CT1/a.dcm"
        assert there.path("ct/sending/CT1/a.dcm") == "/srv/share/ct/sending/CT1/a.dcm"
        assert here.key("/mnt/pacs/ctx/sending/a") == "/mnt/pacs/ctx/sending/a"  # a sibling is not beneath it
        assert here.path("/old/absolute") == "/old/absolute" and here.path("mr/sending/a") == "mr/sending/a"

    def test_two_hosts_see_one_journal_through_their_own_paths(self, tmp_path):
        store = SqliteJournal(tmp_path / JOURNAL_FILE)
        a = KeyedJournal(store, RootKeys([("/mnt/a/ct", "ct")]))
        b = KeyedJournal(store, RootKeys([("/srv/b/ct", "ct")]))
        try:
            a.ensure("/mnt/a/ct/sending/x.dcm", ["orthanc"], sop="1.2")
            a.apply([Update("/mnt/a/ct/sending/x.dcm", "orthanc", "delivered", "delivered", sop="1.2", digest="d")])
            rows = b.rows_of(["/srv/b/ct/sending/x.dcm"])["/srv/b/ct/sending/x.dcm"]
            assert rows["orthanc"].state == "delivered" and rows["orthanc"].path == "/srv/b/ct/sending/x.dcm"
            assert b.paths_under("/srv/b/ct/sending") == ["/srv/b/ct/sending/x.dcm"]
            assert b.known_instances("orthanc", ["1.2"])["1.2"].path == "/srv/b/ct/sending/x.dcm"
            store.join("gw-a", "h", 1, 0)
            a.claimed("gw-a", [], ["/mnt/a/ct/sending/y.dcm"])
            assert b.owners(["/srv/b/ct/sending/y.dcm"]) == {"/srv/b/ct/sending/y.dcm": "gw-a"}
            b.rename("/srv/b/ct/sending/x.dcm", "/srv/b/ct/failed/x.dcm")
            assert a.sop_of("/mnt/a/ct/failed/x.dcm") == "1.2" and a.counts() == {"orthanc": {"delivered": 1}}
        finally:
            store.close()


def test_the_journal_password_comes_from_its_file_and_never_shows(tmp_path):
    from relaypacsd.config import ConfigError, journal_password
    from relaypacsd.pg_db import masked_url

    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    config = build_config({"watch": [{"path": "/srv/ct"}],
                           "journal": {"url": "postgresql://u@db/x", "password_file": str(secret)}}, {})
    assert journal_password(config.journal).reveal() == "hunter2" and "hunter2" not in repr(journal_password(config.journal))
    secret.write_text("")
    with pytest.raises(ConfigError, match="journal.password_file.*empty"):
        journal_password(config.journal)
    assert masked_url("postgresql://u:hunter2@db:5432/x") == "postgresql://u:********@db:5432/x"


def test_an_unreachable_postgresql_is_one_line_naming_the_url_and_what_to_check(tmp_path):
    from relaypacsd.daemon import Daemon
    from relaypacsd.errors import ConfigError
    from relaypacsd.localorthanc import free_port

    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")}, "watch": [{"path": str(tmp_path / "s")}],
                           "delivery": {"enabled": False},
                           "journal": {"url": f"postgresql://relaypacs@127.0.0.1:{free_port()}/relaypacs",
                                       "password_file": str(secret)}}, {})
    with pytest.raises(ConfigError) as exc:
        Daemon(config, senders={})
    text = str(exc.value)
    assert text.startswith("journal.url = postgresql://relaypacs@127.0.0.1:") and "pg_hba.conf" in text
    assert "hunter2" not in text and "\n" not in text


def test_status_shows_every_node_and_its_view_of_each_pacs(tmp_path, capsys):
    import json

    from relaypacsd import cli

    conf = tmp_path / "relaypacs.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[watch]]\npath = "{tmp_path / "spool"}"\n'
                    '[pacs.orthanc]\nurl = "http://127.0.0.1:1"\n')
    j = SqliteJournal(tmp_path / "state" / JOURNAL_FILE)
    j.join("gw-a", "host-a", 1, 0)
    j.beat("gw-a", 1, {"orthanc": {"healthy": True, "reason": ""}})
    j.close()
    assert cli.main(["-c", str(conf), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(n["name"], n["host"], n["state"]) for n in doc["nodes"]] == [("gw-a", "host-a", "alive")]
    assert cli.main(["-c", str(conf), "status"]) == 0
    text = capsys.readouterr().out
    assert "gw-a" in text and "host-a" in text and "orthanc (as it sees it)" in text


def test_a_sweep_queues_only_this_nodes_files_and_adopts_the_unowned_after_a_grace(tmp_path):
    """The untracked scan with a shared journal's ownership (the 70 s outage bug: each node took all)."""
    import threading

    from relaypacsd.spool import Spool
    from relaypacsd.untracked import UntrackedScan

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    for name in ("mine", "theirs", "nobodys"):
        (spool.sending / f"{name}.dcm").write_bytes(b"x")
    owners = {str(spool.sending / "mine.dcm"): "gw-a", str(spool.sending / "theirs.dcm"): "gw-b"}
    journal = SimpleNamespace(shared=True, owners=lambda keys: {k: owners[k] for k in keys if k in owners},
                              adopt=lambda name, epoch, keys, grace: [])
    node = Node(_config(tmp_path), journal)  # type: ignore[arg-type]
    queued = []
    scan = UntrackedScan([spool], lambda p: False, lambda keys: set(), lambda s, p: queued.append(p.name),
                         threading.Event(), mine=node.mine)
    assert scan.scan() == 1
    assert queued == ["mine.dcm"]
