"""C-STORE against a real Orthanc and a real DCMTK storescp, and the STOW -> C-STORE fallback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from relaypacsd.config import PacsConfig
from relaypacsd.cstore import CStoreSender, classify_status
from relaypacsd.errors import DestinationProblem, PacsUnreachable
from relaypacsd.localorthanc import free_port
from relaypacsd.loopback import listening_sockets, loopback_shim
from relaypacsd.models import Part
from relaypacsd.outcomes import Outcome
from relaypacsd.senders import FallbackSender, build_sender
from tests.dicomfactory import MR_SMALL, write_study
from tests.integration.pacs_helpers import cstore_pacs


def _parts(folder: Path, n: int, template: Path | None = None) -> tuple[str, list[Part]]:
    kwargs = {"template": template} if template else {}
    study, sops = write_study(folder, n, **kwargs)
    files = sorted(folder.glob("*.dcm"))
    return study, [Part(f, s, f.stat().st_size) for f, s in zip(files, sops)]


def test_cstore_to_orthanc_stores_every_instance(clean_orthanc, tmp_path):
    _, parts = _parts(tmp_path / "a", 5)
    sender = CStoreSender(cstore_pacs(clean_orthanc))
    results, status = sender.send(parts)
    assert status is None
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 5
    assert {p.sop_uid for p in parts} <= clean_orthanc.list_instance_uids()
    # again: Orthanc answers success for a known instance (it keeps the original)
    results, _ = sender.send(parts[:2])
    assert all(r.outcome.delivered for r in results)


def test_cstore_mixed_sop_classes_one_association(clean_orthanc, tmp_path):
    _, ct = _parts(tmp_path / "ct", 2)
    _, mr = _parts(tmp_path / "mr", 2, MR_SMALL)
    results, _ = CStoreSender(cstore_pacs(clean_orthanc)).send(ct + mr)
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    assert {p.sop_uid for p in ct + mr} <= clean_orthanc.list_instance_uids()


def test_cecho_probe_and_unreachable_port(clean_orthanc):
    sender = CStoreSender(cstore_pacs(clean_orthanc))
    sender.probe()
    assert sender.echo() < 5000
    dead = CStoreSender(cstore_pacs(clean_orthanc, dicom_port=free_port(), connect_timeout=1.0))
    with pytest.raises(PacsUnreachable) as err:
        dead.probe()
    msg = str(err.value)
    assert "orthanc" in msg and "127.0.0.1:" in msg and "dicom_port" in msg and "RELAYPACS_GW" in msg


def test_wrong_called_ae_is_a_destination_problem(orthanc_factory, tmp_path):
    strict = orthanc_factory(extra={"DicomCheckCalledAet": True})
    sender = CStoreSender(cstore_pacs(strict, ae_title="NOT_ORTHANC"))
    with pytest.raises(DestinationProblem) as err:
        sender.probe()
    assert "NOT_ORTHANC" in str(err.value) and "ae_title" in str(err.value)


def test_nodelay_is_set_and_faster(clean_orthanc, tmp_path):
    """TCP_NODELAY on our side: per-instance latency against Orthanc (TCP_NODELAY=1) drops several-fold."""
    rounds: dict[bool, list[float]] = {False: [], True: []}
    for rnd in range(3):  # best of three: a busy machine only adds time, and to both alike
        for nodelay in (False, True):
            _, parts = _parts(tmp_path / f"r{rnd}-n{nodelay}", 12)
            sender = CStoreSender(cstore_pacs(clean_orthanc), nodelay=nodelay)
            sender.send(parts[:2])
            t = time.monotonic()
            results, _ = sender.send(parts[2:])
            rounds[nodelay].append((time.monotonic() - t) / 10)
            assert all(r.outcome is Outcome.DELIVERED for r in results)
    timings = {nodelay: min(times) for nodelay, times in rounds.items()}
    print(f"C-STORE per instance: Nagle {timings[False] * 1000:.1f} ms, TCP_NODELAY {timings[True] * 1000:.1f} ms")
    assert timings[True] < timings[False] / 2


@pytest.fixture
def storescp(tmp_path):
    exe = shutil.which("storescp")
    if exe is None:
        pytest.skip("dcmtk storescp not installed")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    # storescp binds every interface and has no bind option: the same LD_PRELOAD shim as LocalOrthanc
    # turns its wildcard bind into 127.0.0.1, checked below in /proc/net/tcp.
    env = dict(os.environ, TCP_NODELAY="1", LD_PRELOAD=str(loopback_shim(fallback_dir=tmp_path)))
    proc = subprocess.Popen([exe, "-aet", "STORESCP", "-od", str(out), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    listening = [s for s in listening_sockets() if s[1] == port]
    ok = bool(listening) and all(addr == "0100007F" for addr, _, _ in listening)
    if not ok:
        proc.kill()
    assert ok, f"storescp must listen on 127.0.0.1 only: {listening}"
    yield port, out
    proc.terminate()
    proc.wait(timeout=5)


def test_cstore_to_dcmtk_storescp(storescp, tmp_path):
    port, out = storescp
    _, parts = _parts(tmp_path / "s", 3)
    pacs = PacsConfig(name="scp", url="http://127.0.0.1:1", ae_title="STORESCP", dicom_host="127.0.0.1",
                      dicom_port=port, connect_timeout=3.0, read_timeout=30.0)  # heavy load may slow an answer
    sender = CStoreSender(pacs)
    sender.probe()
    results, _ = sender.send(parts)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 3
    time.sleep(0.2)
    names = {f.name for f in out.iterdir()}
    assert len(names) == 3
    assert all(any(p.sop_uid in n for n in names) for p in parts)


def test_fallback_stow_port_closed_delivers_via_cstore(clean_orthanc, tmp_path):
    _, parts = _parts(tmp_path / "f", 4)
    pacs = cstore_pacs(clean_orthanc, url=f"http://127.0.0.1:{free_port()}", fallback="cstore", connect_timeout=1.0)
    sender = build_sender(pacs)
    assert isinstance(sender, FallbackSender)
    sender.probe()  # STOW down, C-ECHO fine: healthy
    results, status = sender.send(parts)
    assert status is None and all(r.outcome is Outcome.DELIVERED for r in results)
    assert sender.last_path == "C-STORE"
    assert {p.sop_uid for p in parts} <= clean_orthanc.list_instance_uids()


def test_fallback_not_used_when_stow_works_or_refuses_credentials(clean_orthanc, tmp_path):
    _, parts = _parts(tmp_path / "g", 2)
    sender = build_sender(cstore_pacs(clean_orthanc, fallback="cstore"))
    results, status = sender.send(parts)
    assert status == 200 and sender.last_path == "STOW-RS"
    from relaypacsd.config import Secret
    bad = build_sender(cstore_pacs(clean_orthanc, fallback="cstore", password=Secret("wrong")))
    with pytest.raises(DestinationProblem) as err:
        bad.send(parts)
    assert err.value.status == 401


def test_classify_status_table():
    assert classify_status(0x0000)[0] is Outcome.DELIVERED
    for code in (0xB000, 0xB006, 0xB007):
        assert classify_status(code)[0] is Outcome.DELIVERED
    for code in (0xA700, 0xA7FF, 0x0213):
        assert classify_status(code)[0] is Outcome.TRANSIENT
    for code in (0xA900, 0xC000, 0xC123, 0x0122):
        assert classify_status(code)[0] is Outcome.PERMANENT
    for code in (0x0111, 0xA770, 0xB00E):  # dcm4chee's and Azure's "already have it" too
        assert classify_status(code)[0] is Outcome.DUPLICATE
    outcome, words = classify_status(0x0124)  # not authorized: the PACS's setup; the file waits
    assert outcome is Outcome.TRANSIENT and "allow it on the PACS" in words
    assert classify_status(None)[0] is Outcome.TRANSIENT
