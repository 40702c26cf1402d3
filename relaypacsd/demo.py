"""`relaypacsd demo`: a working local setup in one command (a private Orthanc on loopback + a demo spool)."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from loguru import logger

from relaypacsd.config import load_config
from relaypacsd.daemon import Daemon
from relaypacsd.logs import setup_logging


def _port_or_free(preferred: int) -> int:
    """The usual port when it is free on loopback, else any free one."""
    from relaypacsd.localorthanc import free_port

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def _demo_web(workdir: Path) -> tuple[str, str]:
    """The dashboard on loopback with one operator account (its password in a private file): the [web]
    table and the banner's lines."""
    from relaypacsd.localorthanc import write_private
    from relaypacsd.web.users import User, hash_password, read_users, write_users

    users_file, pw_file = workdir / "web-users.json", workdir / "web-password"
    if not pw_file.exists() or not users_file.exists():
        write_private(pw_file, secrets.token_urlsafe(12))
        write_users(users_file, {"demo": User("demo", "operator", hash_password(pw_file.read_text().strip()))})
    read_users(users_file)  # a file that is not ours fails here with its fix
    port = _port_or_free(8080)
    toml = f'[web]\naddress = "127.0.0.1"\nport = {port}\nusers_file = "{users_file}"\n\n'
    ui = (f"  Dashboard:                 http://127.0.0.1:{port}/\n"
          f"                            user demo, password in {pw_file}\n")
    return toml, ui


def run_demo(workdir: Path) -> int:
    """Start (or reuse via ORTHANC_URL) a PACS, write demo/relaypacs.toml, run the daemon in the foreground."""
    workdir = workdir.resolve()
    spool = workdir / "spool"
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging()
    orthanc = None
    pacs_toml = ""
    ui = ""
    if not os.environ.get("ORTHANC_URL"):
        from relaypacsd.localorthanc import LocalOrthanc, write_private

        pw_file = workdir / "orthanc-password"
        if not pw_file.exists():
            write_private(pw_file, secrets.token_urlsafe(16))
        orthanc = LocalOrthanc(workdir / "orthanc", http_port=_port_or_free(8042), dicom_port=_port_or_free(4242),
                               username="relaypacs", password=pw_file.read_text().strip())
        orthanc.start()
        pacs_toml = (f'[pacs.orthanc]\ntype = "orthanc"\nurl = "{orthanc.url}"\nusername = "relaypacs"\n'
                     f'password_file = "{pw_file}"\nae_title = "ORTHANC"\ndicom_host = "127.0.0.1"\n'
                     f"dicom_port = {orthanc.dicom_port}\n")
        ui = (f"  Orthanc (the PACS) web UI: {orthanc.url}/app/explorer.html\n"
              f"                            user relaypacs, password in {pw_file}\n")
    web_toml, web_ui = _demo_web(workdir)
    config_path = workdir / "relaypacs.toml"
    config_path.write_text(
        "# written by `relaypacsd demo`\n"
        f'[daemon]\nstate_dir = "{workdir / "state"}"\n\n'
        "[delivery]\nretry_sweep_interval = 10\nhealth_interval = 10\n\n"
        f'[[watch]]\npath = "{spool}"\nsettle_seconds = 1.0\n\n' + web_toml + pacs_toml)
    try:
        config = load_config(config_path)
        daemon = Daemon(config)

        def banner() -> None:
            sample = Path(__import__("pydicom").data.get_testdata_file("CT_small.dcm"))
            print("\n" + "=" * 78 + "\n relaypacsd demo is running (Ctrl-C stops it)\n\n"
                  f"  Drop DICOM files into:     {spool / 'inbox'}/\n"
                  f"  Delivered files move to:   {spool / 'sent'}/\n"
                  f"  Rejected files move to:    {spool / 'failed'}/  (with a .error.json saying why)\n"
                  f"{web_ui}{ui}"
                  f"  Config:                    {config_path}\n\n"
                  f"  Try it:  cp {sample} {spool / 'inbox'}/\n" + "=" * 78 + "\n", flush=True)

        daemon.on_ready = banner
        return daemon.run()
    finally:
        if orthanc is not None:
            logger.info("stopping the demo Orthanc")
            orthanc.stop()
