#!/bin/sh
# Container entrypoint: run relaypacsd under tini when the image has it and we are PID 1 (tini forwards
# signals and reaps zombies); otherwise exec relaypacsd directly (e.g. `docker run --init` already did it).
if [ "$$" = 1 ] && command -v tini >/dev/null 2>&1; then
    exec tini -- relaypacsd "$@"
fi
exec relaypacsd "$@"
