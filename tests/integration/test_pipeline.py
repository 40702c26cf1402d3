"""The pipeline end to end: real files on a real filesystem, the daemon, a real Orthanc with DICOMweb."""

from __future__ import annotations

import json
import re
import shutil
import time

import pydicom
from pydicom.data import get_testdata_file

from relaypacsd.localorthanc import LocalOrthanc
from tests.dicomfactory import CT_SMALL, DICOMDIR, MR_SMALL, MR_TRUNCATED, NO_META, write_instance, write_study
from tests.integration.pipeline_helpers import captured_log, files, make_config, pacs_table, running, wait_for


def test_valid_files_reach_orthanc_and_bad_ones_fail_with_a_reason(tmp_path, clean_orthanc):
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)})
    inbox = tmp_path / "spool" / "inbox"
    staging = tmp_path / "staging"
    study, sops = write_study(staging / "ct" / "series1", 12)
    sops.append(write_instance(staging / "mr" / "deep" / "er" / "mr.dcm", MR_SMALL))
    # pydicom's own real files, each with the UIDs it shipped with
    for name in ("JPEG2000.dcm", "SC_rgb_rle.dcm", "MR_small_implicit.dcm"):
        shutil.copy(get_testdata_file(name), staging / name)
        sops.append(str(pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True).SOPInstanceUID))
    bad = {"junk.dcm": b"this is not DICOM" * 10, "empty.dcm": b"", "truncated.dcm": MR_TRUNCATED.read_bytes(),
           "nometa.dcm": NO_META.read_bytes(), "DICOMDIR": DICOMDIR.read_bytes()}
    with running(config), captured_log() as log:
        (inbox / "half-written.dcm.part").write_bytes(b"ignored while named .part")
        for entry in staging.iterdir():  # folders and files renamed into the inbox
            shutil.move(str(entry), inbox / entry.name)
        for name, data in bad.items():  # files written in place
            (inbox / name).write_bytes(data)
        assert wait_for(lambda: len(files(tmp_path, "sent")) == len(sops) and len(files(tmp_path, "failed")) == len(bad))
    assert clean_orthanc.list_instance_uids() == set(sops)
    assert [p.name for p in files(tmp_path, "inbox")] == ["half-written.dcm.part"]
    assert files(tmp_path, "sending") == []
    assert (tmp_path / "spool" / "sent" / "mr" / "deep" / "er" / "mr.dcm").exists()  # subpaths kept
    reasons = {p.name: json.loads(p.with_name(p.name + ".error.json").read_text()) for p in files(tmp_path, "failed")}
    assert set(reasons) == set(bad)
    assert "not a DICOM file" in reasons["junk.dcm"]["reason"]
    assert "empty file" in reasons["empty.dcm"]["reason"]
    assert "truncated" in reasons["truncated.dcm"]["reason"]
    assert "Part-10" in reasons["nometa.dcm"]["reason"]
    assert reasons["DICOMDIR"]["stage"] == "dicomdir"
    assert all(r["stage"] in ("validation", "dicomdir") and r["time"] for r in reasons.values())
    forwarded = [line for line in log if "PACS forward orthanc delivered" in line]
    assert forwarded and all(" ms " in line and "uids=" in line and "files=" in line for line in forwarded)
    assert sum(line.count(",") + 1 for line in (l.split("uids=")[1] for l in forwarded)) == len(sops)
    assert not any(clean_orthanc.password in line for line in log)


def test_files_waiting_before_start_are_picked_up(tmp_path, clean_orthanc):
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)})
    study, sops = write_study(tmp_path / "spool" / "inbox" / "night", 5)
    with running(config):
        assert wait_for(lambda: len(files(tmp_path, "sent")) == 5)
    assert clean_orthanc.list_instance_uids() == set(sops)


def test_a_slow_writer_is_never_sent_half_written(tmp_path, clean_orthanc):
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)}, watch={"settle_seconds": 0.5})
    source = tmp_path / "src.dcm"
    sop = write_instance(source, CT_SMALL)
    data = source.read_bytes()
    target = tmp_path / "spool" / "inbox" / "slow.dcm"
    with running(config):
        with open(target, "wb") as fh:  # one open handle, pauses longer than the settle time
            for i in range(0, len(data), 8000):
                fh.write(data[i:i + 8000])
                fh.flush()
                time.sleep(0.8)
                assert files(tmp_path, "sending") == [] and files(tmp_path, "sent") == []
        assert wait_for(lambda: len(files(tmp_path, "sent")) == 1)
    assert files(tmp_path, "failed") == []
    assert files(tmp_path, "sent")[0].read_bytes() == data
    assert clean_orthanc.list_instance_uids() == {sop}


def test_duplicates_count_as_delivered(tmp_path, clean_orthanc):
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)})
    sop = write_instance(tmp_path / "a.dcm")
    inbox = tmp_path / "spool" / "inbox"
    with running(config):
        shutil.copy(tmp_path / "a.dcm", inbox / "first.dcm")
        assert wait_for(lambda: len(files(tmp_path, "sent")) == 1)
        shutil.copy(tmp_path / "a.dcm", inbox / "again.dcm")
        assert wait_for(lambda: len(files(tmp_path, "sent")) == 2)
    assert clean_orthanc.list_instance_uids() == {sop}


def test_wrong_password_files_wait_and_the_log_says_what_to_check(tmp_path, clean_orthanc):
    table = pacs_table(clean_orthanc)
    table["password"] = "definitely-wrong-pw"
    config = make_config(tmp_path, {"orthanc": table})
    write_study(tmp_path / "spool" / "inbox", 3)
    with captured_log() as log, running(config):
        assert wait_for(lambda: len(files(tmp_path, "sending")) == 3, timeout=10)
        time.sleep(2.5)  # several sweeps and probes
        assert len(files(tmp_path, "sending")) == 3 and files(tmp_path, "failed") == []
    text = "\n".join(log)
    down = [l for l in log if "DOWN" in l]
    assert len(down) == 1, down  # said once, not once per sweep
    assert "orthanc" in down[0] and clean_orthanc.url in down[0] and "ORTHANC_PASSWORD" in down[0]
    assert "definitely-wrong-pw" not in text and clean_orthanc.password not in text
    assert clean_orthanc.count_instances() == 0


def test_pacs_disabled_validates_and_parks_files(tmp_path, clean_orthanc):
    config = make_config(tmp_path, {"orthanc": pacs_table(clean_orthanc)}, env={"PACS_ENABLED": "false"})
    write_study(tmp_path / "spool" / "inbox", 2)
    (tmp_path / "spool" / "inbox" / "junk.dcm").write_bytes(b"junk" * 100)
    with running(config):
        assert wait_for(lambda: len(files(tmp_path, "sending")) == 2 and len(files(tmp_path, "failed")) == 1)
        time.sleep(1.5)
    assert clean_orthanc.count_instances() == 0 and len(files(tmp_path, "sending")) == 2


def test_environment_only_pacs_and_dcm4chee_layout(tmp_path, clean_orthanc, orthanc_factory):
    dcm = orthanc_factory(username=None, dicomweb_root="/dcm4chee-arc/aets/DCM4CHEE/rs/")
    user, password = clean_orthanc.auth
    env = {"ORTHANC_URL": clean_orthanc.url, "ORTHANC_USERNAME": user, "ORTHANC_PASSWORD": password,
           "DCM4CHEE_URL": dcm.url, "DCM4CHEE_AE_TITLE": "DCM4CHEE", "ACTIVE_PACS": "orthanc,dcm4chee"}
    config = make_config(tmp_path, {}, env=env)
    assert config.pacs["dcm4chee"].stow_base == dcm.url + "/dcm4chee-arc/aets/DCM4CHEE/rs"
    study, sops = write_study(tmp_path / "spool" / "inbox", 6)
    with running(config):
        assert wait_for(lambda: len(files(tmp_path, "sent")) == 6)
    assert clean_orthanc.list_instance_uids() == set(sops) == dcm.list_instance_uids()


def test_outage_files_wait_then_all_arrive_within_one_sweep(tmp_path, orthanc_factory):
    """Stop one PACS, drop 50 files, wait past several sweeps, start it again (issue #3)."""
    main = orthanc_factory()
    other = orthanc_factory(username=None, dicomweb_root="/dcm4chee-arc/aets/DCM4CHEE/rs/")
    sweep = 2.0
    config = make_config(tmp_path, {"orthanc": pacs_table(main),
                                    "dcm4chee": pacs_table(other, type="dcm4chee", ae_title="DCM4CHEE")},
                         retry_sweep_interval=sweep, health_interval=1.0)
    with captured_log() as log, running(config) as daemon:
        main.stop(timeout=0)
        study, sops = write_study(tmp_path / "spool" / "inbox", 50)
        assert wait_for(lambda: other.count_instances() == 50, timeout=30)
        time.sleep(3 * sweep)
        assert len(files(tmp_path, "sending")) == 50 and files(tmp_path, "failed") == []
        assert not daemon.engine.destinations["orthanc"].healthy
        back = LocalOrthanc(main.workdir, http_port=main.http_port, dicom_port=main.dicom_port,
                            username=main.username, password=main.password).start()
        try:
            t0 = time.monotonic()
            assert wait_for(lambda: len(files(tmp_path, "sent")) == 50, timeout=30)
            recovery = time.monotonic() - t0
            assert back.list_instance_uids() == set(sops)
            # Counted now: stopping Orthanc below, with the daemon still up, rightly logs a second DOWN.
            changes = [l for l in log if "DOWN" in l or "reachable again" in l]
            back_at = next(i for i, l in enumerate(log) if "reachable again" in l)
            # The files went because the PACS came back, not at a later sweep: no sweep released any.
            assert not [l for l in log[back_at:] if re.search(r"retry sweep: [1-9]", l)], log[back_at:]
        finally:
            back.stop(timeout=0)
    # Typically 0.2-0.5 s; the bound leaves room for a busy CI machine (the mechanism is asserted above).
    assert recovery < sweep + config.delivery.health_interval + 5, recovery
    assert files(tmp_path, "failed") == []
    to_other = [u for l in log if "PACS forward dcm4chee delivered" in l for u in l.split("uids=")[1].split(",")]
    assert sorted(to_other) == sorted(sops)  # each file exactly once to the PACS that stayed up
    assert sum("DOWN" in l for l in changes) == 1 and sum("reachable again" in l for l in changes) == 1, changes
    print(f"outage test: recovery after Orthanc came back took {recovery:.2f} s (sweep {sweep} s)")
