"""Several gateways on one spool (#14), for real: two or three daemons, each through its own bindfs view of the
share, one PostgreSQL journal, one Orthanc counting every instance it receives."""

from __future__ import annotations

import signal
import time

from tests.integration.daemon_helpers import daemon_log, stop_daemon, wait_for
import pytest

from tests.integration.gateways_helpers import (LEASE, all_sent, assert_each_file_once, counting_pacs, drop, log_lines,
                                                node_config, share_views, start_nodes)


@pytest.fixture
def counting_orthanc(tmp_path):
    """A real Orthanc counting each instance it receives."""
    yield from counting_pacs(tmp_path)


@pytest.fixture
def share(tmp_path):
    """The share: a backing folder and a bindfs view per node."""
    yield from share_views(tmp_path)


def _nodes(tmp_path, share, orthanc, postgres, names=("gw-a", "gw-b"), **delivery):
    journal = {"url": postgres.url}
    return [node_config(tmp_path, name, share.view(name), orthanc, journal, **delivery) for name in names]


def test_a_pacs_outage_with_two_gateways_sends_each_file_once(tmp_path, share, counting_orthanc, clean_postgres):
    """The issue's case: the PACS away, 200 files dropped, both nodes sweep; when it returns, 200 confirmations."""
    procs = start_nodes(_nodes(tmp_path, share, counting_orthanc, clean_postgres))
    try:
        counting_orthanc.stop()
        sops = drop(share, 200)
        # Past the quick retries and several sweeps of both nodes: every file claimed and waiting in sending/.
        wait_for(lambda: len(list((share.spool / "sending").rglob("*.dcm"))) == 200, timeout=30)
        wait_for(lambda: all(log_lines(p, "is DOWN") for p in procs), timeout=20)
        time.sleep(4)
        counting_orthanc.restart()
        all_sent(share, 200, procs)
    finally:
        for proc in procs:
            stop_daemon(proc)
    received = counting_orthanc.received()
    assert sorted(received) == sorted(sops) and set(received.values()) == {1}, received.most_common(3)
    assert_each_file_once(share, 200)
    assert all(log_lines(p, "delivered") for p in procs), "both nodes took part"


def _backlog_of(postgres, node: str) -> int:
    """How many files wait in `node`'s backlog (outside its active window), by the journal."""
    out = postgres.psql("SELECT COUNT(DISTINCT d.path) FROM deliveries d JOIN owners o ON o.key = d.path "
                        f"WHERE d.backlog = 1 AND o.node = '{node}' AND o.kind = 'owned'").strip()
    return int(out or 0)


def _drop_in_waves(share, ready, failure, first: int = 100) -> list[str]:
    """Drop `first` files, then waves of 100 until `ready()`: one node's scan of the share may claim nearly a whole
    wave before the others see it (seen in CI: 185 against 15); the UIDs dropped, or AssertionError(failure())."""
    sops: list[str] = []
    for wave in range(4):
        sops += drop(share, first if wave == 0 else 100)
        try:
            wait_for(ready, timeout=20, interval=0.02)
            return sops
        except AssertionError:
            continue
    raise AssertionError(failure())


def test_an_outage_longer_than_two_windows_with_a_node_killed_sends_each_file_once(tmp_path, share, counting_orthanc,
                                                                                   clean_postgres):
    """#14 item 7 with several gateways: windows of 20, 200 files or more waiting through an outage, most of them in
    the nodes' backlogs; one node is killed with files in its backlog, the other takes them over with their rows
    and sends them; each file arrives once."""
    procs = start_nodes(_nodes(tmp_path, share, counting_orthanc, clean_postgres, active_window=20))
    survivor, killed = procs
    try:
        counting_orthanc.stop()
        # With windows of 20, a node that claimed 20 or fewer has nothing in its backlog: waves until both have.
        sops = _drop_in_waves(share, lambda: _backlog_of(clean_postgres, "gw-b") > 0 and
                              _backlog_of(clean_postgres, "gw-a") > 0,
                              lambda: "\n".join(daemon_log(p)[-2500:] for p in procs), first=200)
        wait_for(lambda: len(list((share.spool / "sending").rglob("*.dcm"))) == len(sops), timeout=30)
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        wait_for(lambda: log_lines(survivor, "took over its"), timeout=30,
                 message=lambda: daemon_log(survivor)[-2500:])
        counting_orthanc.restart()
        all_sent(share, len(sops), [survivor])
    finally:
        for proc in procs:
            stop_daemon(proc)
    received = counting_orthanc.received()
    assert sorted(received) == sorted(sops) and set(received.values()) == {1}, received.most_common(3)
    assert_each_file_once(share, len(sops))


def _status(config) -> dict:
    """`relaypacsd status --json` of one node's config, as an operator runs it."""
    import json
    import subprocess
    import sys

    from tests.integration.daemon_helpers import daemon_env

    done = subprocess.run([sys.executable, "-m", "relaypacsd", "-c", str(config), "status", "--json"],
                          capture_output=True, text=True, timeout=60, env=daemon_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _delivered_uids(proc) -> list[list[str]]:
    """The UIDs of each 'delivered' log line of a node, in order."""
    return [line.rsplit("uids=", 1)[1].split(",") for line in log_lines(proc, " delivered: ") if "uids=" in line]


def _holds(postgres, node: str) -> int:
    """How many files in sending/ `node` owns, by the journal."""
    out = postgres.psql(f"SELECT COUNT(*) FROM owners WHERE node = '{node}' AND kind = 'owned'").strip()
    return int(out or 0)


def _drop_until_holding(share, postgres, proc, node: str) -> list[str]:
    """Drop files in waves of 100 until `node` has delivered some and holds some; the UIDs dropped."""
    return _drop_in_waves(share, lambda: _delivered_uids(proc) and _holds(postgres, node) >= 3,
                          lambda: f"{node} never held a file:\n{daemon_log(proc)[-3000:]}")


def _in_flight_bound(procs_killed: int = 1) -> int:
    return procs_killed * 2 * 10  # workers_per_pacs x batch_max_instances of the nodes' config


def test_a_node_killed_mid_delivery_is_taken_over_and_no_confirmed_file_is_sent_again(
        tmp_path, share, counting_orthanc, clean_postgres):
    configs = _nodes(tmp_path, share, counting_orthanc, clean_postgres, names=("gw-a", "gw-b", "gw-c"))
    procs = start_nodes(configs)
    killed = procs[0]
    try:
        sops = _drop_until_holding(share, clean_postgres, killed, "gw-a")
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        died = time.monotonic()
        all_sent(share, len(sops), procs[1:])
        took = [line for p in procs[1:] for line in log_lines(p, "took over its")]
        status = _status(configs[1])
    finally:
        for proc in procs:
            stop_daemon(proc)
    assert took and "gw-a" in took[0], "a live node took the dead one's files"
    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["gw-a"]["state"].startswith("taken over by gw-") and nodes["gw-a"]["files"] == 0
    assert nodes["gw-b"]["state"] == nodes["gw-c"]["state"] == "alive"
    assert nodes["gw-b"]["pacs"]["orthanc"]["healthy"] is True
    assert time.monotonic() - died < 90
    received = counting_orthanc.received()
    assert sorted(received) == sorted(sops)
    duplicates = {uid for uid, n in received.items() if n > 1}
    assert sum(received.values()) - len(sops) <= _in_flight_bound()
    # What the killed node had confirmed before its last requests was never sent again.
    confirmed = [uid for batch in _delivered_uids(killed)[:-2] for uid in batch]
    assert not duplicates & set(confirmed), duplicates & set(confirmed)
    assert_each_file_once(share, len(sops))


def test_a_node_paused_past_its_lease_lets_go_when_it_comes_back(tmp_path, share, counting_orthanc, clean_postgres):
    """SIGSTOP past the lease: the other node takes over; SIGCONT: the paused one learns it lost its lease, lets go
    and joins again. Never a file in two folders, none lost, at worst the requests it had in flight sent twice."""
    procs = start_nodes(_nodes(tmp_path, share, counting_orthanc, clean_postgres))
    paused, other = procs
    try:
        sops = _drop_until_holding(share, clean_postgres, paused, "gw-a")
        paused.send_signal(signal.SIGSTOP)
        wait_for(lambda: log_lines(other, "took over its"), timeout=LEASE + 15, interval=0.2,
                 message=lambda: daemon_log(other)[-3000:])
        time.sleep(1)
        paused.send_signal(signal.SIGCONT)
        wait_for(lambda: log_lines(paused, "lost its lease"), timeout=20, message=lambda: daemon_log(paused)[-3000:])
        later = drop(share, 20, prefix="later")  # the node that came back works again
        all_sent(share, len(sops) + 20, procs)
        wait_for(lambda: len(log_lines(paused, "relaypacsd ready")) >= 2, timeout=30)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            stop_daemon(proc)
    received = counting_orthanc.received()
    assert sorted(received) == sorted(sops + later)
    assert sum(received.values()) - len(sops + later) <= _in_flight_bound()
    assert_each_file_once(share, len(sops + later))
    assert len(log_lines(paused, "lost its lease")) == 1


def test_postgresql_away_mid_run_pauses_claims_and_loses_nothing(tmp_path, share, counting_orthanc):
    """pg_ctl stop -m immediate mid-run: one log line per node naming the URL (password masked) and what to
    check; new files wait in inbox/; PostgreSQL started again, work resumes, every file delivered once or, for
    what was in flight, twice at worst."""
    from tests.integration.daemon_helpers import log_files, assert_no_secrets
    from tests.localpostgres import LocalPostgres

    pg = LocalPostgres(password="pg-s3cret-pw")
    pg.init()
    try:
        secret = tmp_path / "pgpass"
        secret.write_text("pg-s3cret-pw\n")
        journal = {"url": pg.url, "password_file": str(secret)}
        configs = [node_config(tmp_path, name, share.view(name), counting_orthanc, journal) for name in ("gw-a", "gw-b")]
        procs = start_nodes(configs)
        try:
            sops = drop(share, 200)
            wait_for(lambda: sum(len(_delivered_uids(p)) for p in procs) >= 4, timeout=60, interval=0.05)
            pg.stop("immediate")
            wait_for(lambda: all(log_lines(p, "cannot be reached") for p in procs), timeout=20,
                     message=lambda: "\n".join(daemon_log(p)[-2000:] for p in procs))
            waiting = drop(share, 20, prefix="while-away")
            time.sleep(3)
            inbox = [p for p in (share.spool / "inbox").rglob("*.dcm") if "while-away" in p.name]
            assert len(inbox) == 20, "nothing is claimed while the journal is away"
            pg.start()
            all_sent(share, 220, procs)
        finally:
            for proc in procs:
                stop_daemon(proc)
    finally:
        pg.destroy()
    for proc in procs:
        away = log_lines(proc, "cannot be reached")
        # The whole log on failure: a second outage line was seen once in CI under heavy load (not reproduced).
        assert len(away) == 1, "\n".join(daemon_log(proc).splitlines()[-80:])
        assert "postgresql://relaypacs@127.0.0.1" in away[0] and "pg_hba.conf" in away[0] and "inbox/" in away[0]
        assert len(log_lines(proc, "reachable again")) == 1
        assert "Traceback" not in daemon_log(proc)
    received = counting_orthanc.received()
    assert sorted(received) == sorted(sops + waiting)
    assert sum(received.values()) - 220 <= _in_flight_bound(2)
    assert_each_file_once(share, 220)
    assert_no_secrets(log_files(tmp_path), ["pg-s3cret-pw"])


def test_a_second_gateway_with_its_own_sqlite_journal_refuses_the_spool(tmp_path, share, counting_orthanc,
                                                                         clean_postgres):
    """One gateway per spool on SQLite: a second one (its own SQLite, or a PostgreSQL) refuses to start with one
    line naming the node that serves the spool and how to run several."""
    from tests.integration.daemon_helpers import start_daemon

    first = node_config(tmp_path, "gw-a", share.view("gw-a"), counting_orthanc, {})
    running = start_nodes([first])
    try:
        for name, journal in (("gw-b", {}), ("gw-c", {"url": clean_postgres.url})):
            second = start_daemon(node_config(tmp_path, name, share.view(name), counting_orthanc, journal))
            assert second.wait(30) != 0
            lines = [line for line in daemon_log(second).splitlines() if line.strip()]
            refusal = [line for line in lines if "is served by node gw-a" in line]
            assert len(refusal) == 1 and "PostgreSQL" in refusal[0] and "Traceback" not in daemon_log(second), lines
        sops = drop(share, 5)
        all_sent(share, 5, running)  # the first one serves on
    finally:
        stop_daemon(running[0])
    assert sorted(counting_orthanc.received()) == sorted(sops)
