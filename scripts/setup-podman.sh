#!/bin/sh
# Prepare this machine to build and run the relaypacsd image with podman, without a container registry.
# Idempotent: safe to run before every test session (CI: .ci/run calls it; tests/integration/test_container.py
# calls it too when podman is missing and it runs as root).
#   1. apt packages: podman (builds Dockerfiles, runs containers), runc (crun fails on hybrid cgroups here),
#      debootstrap (the base image, since no registry is reachable).
#   2. /etc/containers/containers.conf: runc, cgroupfs, file event log, and ulimits within the machine's limits.
#   3. the base image localhost/relaypacsd-base:bookworm (Debian + Python 3.11 + tini), built once and cached.
set -eu
BASE_IMAGE=${BASE_IMAGE:-localhost/relaypacsd-base:bookworm}

if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq podman runc debootstrap >/dev/null
fi

mkdir -p /etc/containers
if ! grep -qs 'relaypacsd' /etc/containers/containers.conf; then
    cat > /etc/containers/containers.conf <<'CONF'
# written by relaypacsd scripts/setup-podman.sh
[containers]
# the machine's hard limits; the runtime cannot raise them (setrlimit EPERM otherwise)
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"            # crun fails here: "cgroups in hybrid mode not supported"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi

if ! podman image exists "$BASE_IMAGE"; then
    ROOTFS=$(mktemp -d /var/tmp/relaypacsd-rootfs.XXXXXX)
    trap 'rm -rf "$ROOTFS"' EXIT
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,tini \
        bookworm "$ROOTFS" "$MIRROR" >/dev/null
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar --numeric-owner -C "$ROOTFS" -c . | podman import --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
fi
echo "podman ready: $(podman --version), base image $BASE_IMAGE"
