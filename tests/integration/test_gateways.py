"""Several gateways on one spool (#14), for real: two or three daemons, each through its own bindfs view of the
share, one PostgreSQL journal, one Orthanc counting every instance it receives."""

from __future__ import annotations

import signal
import time

from tests.integration.daemon_helpers import daemon_log, stop_daemon, wait_for
from tests.integration.gateways_helpers import (LEASE, all_sent, assert_each_file_once, counting_orthanc, drop,  # noqa: F401
                                                log_lines, node_config, share, start_nodes)


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
