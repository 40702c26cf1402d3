"""The container image, built and run with podman (no registry, no Docker daemon here: see
/work/shared/notes/containers.md and scripts/setup-podman.sh).

Offline build: wheels of relaypacsd and its dependencies go into the build context (`pip wheel`), the base
image is a Debian root filesystem built once by debootstrap and cached. The container runs with
--network host against the test Orthanc on 127.0.0.1. Slow (~5-10 s with the cached base image, ~1 min on
the first run): marked `container`, still part of the normal suite. With CI=true a missing podman FAILS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.dicomfactory import write_instance
from tests.integration.daemon_helpers import count_in, wait_for

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup-podman.sh"
BASE_IMAGE = "localhost/relaypacsd-base:bookworm"
UID = 10001


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def podman_ready() -> None:
    """podman, runc, containers.conf and the cached base image (scripts/setup-podman.sh, idempotent)."""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        result = subprocess.run(["sh", str(SETUP)], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "BASE_IMAGE": BASE_IMAGE})
        if result.returncode != 0:
            _unavailable(f"{SETUP} failed:\n{result.stdout}\n{result.stderr}")
    if not shutil.which("podman"):
        _unavailable("podman is not installed: run scripts/setup-podman.sh as root")
    if _podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        _unavailable(f"base image {BASE_IMAGE} missing: run scripts/setup-podman.sh as root")


@pytest.fixture(scope="module")
def image(podman_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the image from the repository's Dockerfile, offline, from wheels in the build context."""
    ctx = tmp_path_factory.mktemp("image-context")
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, ctx / name)
    for name in ("relaypacsd", "docker"):
        shutil.copytree(ROOT / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(ctx / "wheels"), str(ctx)],
                   check=True, capture_output=True, timeout=300)
    tag = "localhost/relaypacsd:test"
    _podman("build", "-q", "--format", "docker", "--network", "none", "--build-arg", f"BASE={BASE_IMAGE}",
            "--build-arg", "WHEELS=wheels", "-t", tag, str(ctx), timeout=600)
    return tag


def test_container_forwards_runs_as_10001_is_healthy_and_stops_cleanly(image, clean_orthanc, tmp_path):
    spool, state = tmp_path / "spool", tmp_path / "state"
    for d in (spool, state):
        d.mkdir()
        os.chown(d, UID, UID)
    secret = tmp_path / "orthanc-password"
    secret.write_text(clean_orthanc.password + "\n")
    os.chown(secret, UID, UID)
    secret.chmod(0o400)
    name = f"relaypacsd-test-{uuid.uuid4().hex[:8]}"
    user, _ = clean_orthanc.auth
    _podman("run", "-d", "--name", name, "--network", "host",
            "-v", f"{spool}:/data", "-v", f"{state}:/var/lib/relaypacs", "-v", f"{secret}:/run/secrets/orthanc-password:ro",
            "-e", f"ORTHANC_URL={clean_orthanc.url}", "-e", f"ORTHANC_USERNAME={user}",
            "-e", "ORTHANC_PASSWORD_FILE=/run/secrets/orthanc-password", image)

    def logs() -> str:
        r = _podman("logs", name, check=False)
        return r.stdout + r.stderr

    try:
        wait_for(lambda: "relaypacsd ready" in logs(), 30, message=lambda: logs()[-3000:])
        tmp = spool / "inbox" / ".incoming.tmp"
        uid = write_instance(tmp)
        tmp.rename(spool / "inbox" / "ct.dcm")
        wait_for(lambda: count_in(spool, "sent") == 1, 30, message=lambda: logs()[-3000:])
        assert uid in clean_orthanc.list_instance_uids()

        # Every process of the container (tini and the daemon) runs as the image's numeric user.
        top = _podman("top", name, "huser", "user", "args").stdout.splitlines()[1:]
        assert top and all(line.split()[0] == str(UID) for line in top), top
        assert any("relaypacsd" in line for line in top), top

        health = _podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        started = time.monotonic()
        _podman("stop", "-t", "10", name, timeout=60)
        assert time.monotonic() - started < 10, "SIGTERM was not handled: podman had to SIGKILL"
        state_json = json.loads(_podman("inspect", name).stdout)[0]["State"]
        assert state_json["ExitCode"] == 0, logs()
        text = logs()
        assert "relaypacsd stopped" in text
        assert clean_orthanc.password not in text
        json.loads(text.strip().splitlines()[-1])  # the container config logs JSON
    finally:
        _podman("rm", "-f", name, check=False)
