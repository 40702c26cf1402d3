"""The private Orthanc's REST helpers, against a stand-in server (the real Orthanc is in tests/integration)."""

import socket
import threading

from relaypacsd.localorthanc import LocalOrthanc


def test_a_get_on_a_connection_closed_under_it_is_retried(tmp_path):
    """Orthanc drops idle keep-alive connections after a second: a GET reusing one as it closes must not
    fail a caller (it failed a CI run once: 'Remote end closed connection without response')."""
    srv = socket.create_server(("127.0.0.1", 0))
    requests_seen = []

    def serve() -> None:
        for answer in (False, True):  # the first request gets no answer at all
            conn, _ = srv.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                requests_seen.append(data.split(b" ", 2)[:2])
                if answer:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n[]")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        orthanc = LocalOrthanc(tmp_path, http_port=srv.getsockname()[1], dicom_port=1, username=None)
        assert orthanc.rest("GET", "/instances") == []
    finally:
        srv.close()
        thread.join(5)
    assert requests_seen == [[b"GET", b"/instances"]] * 2


def test_the_config_holding_the_password_is_owner_only(tmp_path):
    """Orthanc's config holds the HTTP password in clear: 0600, even over a file an earlier run left 0644."""
    orthanc = LocalOrthanc(tmp_path, http_port=18042, dicom_port=14242, password="s3cret-pw")
    orthanc.config_path.write_text("{}")
    orthanc.config_path.chmod(0o644)
    path = orthanc.write_config()
    assert path.stat().st_mode & 0o777 == 0o600
    assert "s3cret-pw" in path.read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_password_file_is_owner_only_from_the_start(tmp_path):
    from relaypacsd.localorthanc import write_private

    target = tmp_path / "orthanc-password"
    write_private(target, "pw")
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_text() == "pw"
