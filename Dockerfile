# relaypacsd container image.
#   Online (PyPI):   docker build -t relaypacsd .
#   Offline:         pip wheel --wheel-dir wheels .   then   docker build --build-arg WHEELS=wheels --network none -t relaypacsd .
# Run it with a spool volume at /data and a state volume at /var/lib/relaypacs; see docker-compose.yml and
# docs/operations.md ("Docker").
ARG BASE=python:3.11-slim
FROM ${BASE}

# A folder of wheels in the build context (relaypacsd and every dependency): install from it with no index.
# Empty: install the project from source, dependencies from PyPI.
ARG WHEELS=""

LABEL org.opencontainers.image.title="relaypacsd" \
      org.opencontainers.image.description="Forwards DICOM files dropped into inbox folders to PACS over DICOMweb STOW-RS" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/sh", "-eu", "-c"]

# tini as PID 1: it forwards SIGTERM to the daemon and reaps zombies. The official slim image lacks it, so it
# is installed when the network allows; without it, run the container with `--init` (compose: init: true).
RUN if ! command -v tini >/dev/null 2>&1 && [ -z "$WHEELS" ] && command -v apt-get >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends tini=0.19.* && rm -rf /var/lib/apt/lists/*; \
    fi

# A dedicated numeric user: Kubernetes' runAsNonRoot can verify it, and bind mounts are chowned to 10001.
RUN groupadd --gid 10001 relaypacs \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/relaypacs --no-create-home \
       --shell /usr/sbin/nologin relaypacs

COPY . /src
# From source, a C compiler lives for this layer only: it builds the element walk in C (relaypacsd/elementwalk.c;
# without it the package falls back to the slower walk in Python). Its version does not matter, so it is not pinned.
# hadolint ignore=DL3008
RUN python3 -m venv /opt/relaypacsd \
    && if [ -n "$WHEELS" ]; then \
         /opt/relaypacsd/bin/pip install --no-cache-dir --no-index --find-links "/src/$WHEELS" relaypacsd; \
       else \
         apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
         && /opt/relaypacsd/bin/pip install --no-cache-dir /src \
         && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
       fi \
    && install -d -m 0755 /etc/relaypacs \
    && install -m 0644 /src/docker/relaypacs.toml /etc/relaypacs/relaypacs.toml \
    && install -m 0755 /src/docker/entrypoint.sh /usr/local/bin/relaypacsd-entrypoint \
    && install -d -o 10001 -g 10001 -m 0750 /data /var/lib/relaypacs \
    && rm -rf /src

# Defaults of the operators' seed variables. No password here: pass ORTHANC_PASSWORD_FILE (a secret).
# DL3064 flags ORTHANC_USERNAME by its name; a user name is not a secret.
# hadolint ignore=DL3064
ENV PATH="/opt/relaypacsd/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    RELAYPACS_CONFIG=/etc/relaypacs/relaypacs.toml \
    PACS_ENABLED=true \
    ACTIVE_PACS=orthanc \
    PACS_RETRY_ATTEMPTS=3 \
    PACS_RETRY_DELAY=2 \
    ORTHANC_URL=http://orthanc:8042 \
    ORTHANC_USERNAME=relaypacs

# /data: the spool (inbox/, sending/, sent/, failed/ on ONE volume, so every move is a rename).
# /var/lib/relaypacs: the journal and the heartbeat.
VOLUME ["/data", "/var/lib/relaypacs"]
USER 10001:10001
WORKDIR /var/lib/relaypacs

# The daemon's own liveness check: a fresh heartbeat and every thread alive.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["relaypacsd", "health"]

ENTRYPOINT ["/usr/local/bin/relaypacsd-entrypoint"]
CMD ["run"]
