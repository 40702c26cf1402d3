"""Keeping a test server on 127.0.0.1: a bind() shim for servers without a bind-address setting (Orthanc,
storescp), and a check of what a process really listens on (/proc/net/tcp)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_LISTEN = "0A"
_LOOPBACK_V4 = "0100007F"
_LOOPBACK_V6 = "00000000000000000000000001000000"

SHIM_SOURCE = r"""
/* LD_PRELOAD shim: turn wildcard binds into loopback binds (Orthanc has no bind-address setting). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = 0;
    if (!real_bind) {
        real_bind = (bind_fn) dlsym(RTLD_NEXT, "bind");
        if (!real_bind) { errno = ENOSYS; return -1; }
    }
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t) sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *) &a, sizeof a);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t) sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr) == 0) {
            a.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *) &a, sizeof a);
        }
    }
    return real_bind(fd, addr, len);
}
"""


class LoopbackUnavailable(RuntimeError):
    """The shim cannot be built (no compiler) or written anywhere: a server must not start without it."""


class NotOnLoopback(RuntimeError):
    """A port listens beyond loopback, or not at all."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "relaypacsd"


def loopback_shim(fallback_dir: Path | None = None) -> Path:
    """Path of the compiled bind() shim; compiled once per source version into the cache dir."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    name = f"loopback-bind-{digest}.so"
    dirs = [_cache_dir()] + ([fallback_dir] if fallback_dir else [])
    for d in dirs:
        if (d / name).is_file():
            return d / name
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        # Running without the shim would expose the server on every interface: refuse instead.
        raise LoopbackUnavailable(
            "no C compiler (cc/gcc) found: it is needed to build the shim that keeps the private "
            "Orthanc on 127.0.0.1; install one with: apt-get install -y gcc")
    last_error = ""
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                src = Path(tmp) / "shim.c"
                src.write_text(SHIM_SOURCE)
                out = Path(tmp) / name
                res = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    raise LoopbackUnavailable(f"compiling the loopback shim failed: {res.stderr.strip()}")
                # Atomic rename: concurrent test workers may race to build the same file.
                os.replace(out, d / name)
            return d / name
        except OSError as e:
            last_error = str(e)
    raise LoopbackUnavailable(f"cannot write the loopback shim anywhere ({last_error})")


def listening_sockets() -> list[tuple[str, int, str]]:
    """(local address hex, port, socket inode) of every listening TCP socket in this namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            addr, port = f[1].split(":")
            if f[3] == _LISTEN:
                found.append((addr, int(port, 16), f[9]))
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def check_listening(pid: int, ports: set[int]) -> None:
    """Raise NotOnLoopback unless each port has a listener of process `pid` and every listener on them is on
    loopback."""
    ours = socket_inodes(pid)
    seen: set[int] = set()
    for addr, port, inode in listening_sockets():
        if port not in ports:
            continue
        if addr not in (_LOOPBACK_V4, _LOOPBACK_V6):
            raise NotOnLoopback(f"port {port} listens on {addr} (not loopback): refusing to run")
        if inode in ours:
            seen.add(port)
    if seen != ports:
        raise NotOnLoopback(f"nothing listens on 127.0.0.1 for {sorted(ports - seen)}")
