"""The rehearsal's outage proxy on its own (no cluster): it forwards, cuts and refuses during an
outage, and an armed outage begins at the request that carries its pattern."""

from __future__ import annotations

import http.client
import http.server
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import rehearsal_cluster  # tests/ is on sys.path under pytest

rh = rehearsal_cluster.load()


@pytest.fixture()
def served(tmp_path):
    """A tiny HTTP server, the proxy in front of it (its own process, as `up` starts it) and the
    proxy's outage flag: (proxy URL, flag path)."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok " + self.path.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, flag = rh.free_port(), tmp_path / "outage-test"
    argv = [
        sys.executable,
        str(rh.__file__),
        "proxy",
        str(port),
        str(server.server_port),
        str(flag),
    ]
    proc = subprocess.Popen(argv)
    try:
        rh.wait_until(lambda: rh.port_open(port), "the proxy", "-", timeout=30)
        yield f"http://127.0.0.1:{port}", flag
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()


def get(url: str) -> str | None:
    """The body, or None when the connection is refused or cut."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException):
        return None


def test_forwards_then_refuses_during_an_outage_then_forwards_again(served):
    url, flag = served
    assert get(f"{url}/a") == "ok /a"
    flag.touch()
    assert get(f"{url}/a") is None
    flag.unlink()
    assert get(f"{url}/a") == "ok /a"


def test_an_armed_outage_begins_at_the_request_naming_its_pattern(served):
    url, flag = served
    rh.trip_file(flag).write_bytes(b"/case-3/")
    assert get(f"{url}/case-1/x") == "ok /case-1/x"
    assert get(f"{url}/case-2/x") == "ok /case-2/x"
    assert not flag.exists()
    assert get(f"{url}/case-3/x") is None  # the request carrying the pattern is cut
    assert flag.exists() and not rh.trip_file(flag).exists()
    assert get(f"{url}/case-1/x") is None  # and the server stays unreachable
    flag.unlink()
    time.sleep(0.3)
    assert get(f"{url}/case-1/x") == "ok /case-1/x"
