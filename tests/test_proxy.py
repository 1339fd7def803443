"""deploy/nginx/stockcast.conf, the proxy docker-compose puts in front of TorchServe, run for real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from conftest import ROOT
from helpers import ORIGINAL, post

from stockcast.serve import free_ports

pytestmark = pytest.mark.slow
CONF = ROOT / "deploy" / "nginx" / "stockcast.conf"
MAIN = """daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/error.log crit;
{user}
events {{ worker_connections 2048; }}
http {{
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  include {tmp}/stockcast.conf;
}}
"""


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    """nginx with the shipped server block, upstream and port swapped for the test server's."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        if os.environ.get("CI") == "true":
            pytest.fail("nginx missing in CI: .ci/run installs Debian's nginx")
        pytest.skip("nginx not installed: apt-get install nginx")
    tmp = tmp_path_factory.mktemp("nginx")
    port = free_ports(1)[0]
    text = CONF.read_text()
    assert "server torchserve:8080;" in text and "listen 8080;" in text
    text = text.replace("server torchserve:8080;", f"server 127.0.0.1:{server.ports[0]};")
    (tmp / "stockcast.conf").write_text(text.replace("listen 8080;", f"listen 127.0.0.1:{port};"))
    user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the pytest tmp folder
    (tmp / "nginx.conf").write_text(MAIN.format(tmp=tmp, user=user))
    proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def through(proxy, body, content_type="application/json", method="POST", path="/predictions/lstm"):
    base, server = proxy
    return post(base + path, body, content_type, headers=server.headers(), method=method)


def test_a_forecast_passes_through_with_the_key(proxy):
    direct = post(proxy[1], json.dumps(ORIGINAL))
    assert through(proxy, json.dumps(ORIGINAL)) == direct and direct[0] == 200
    assert through(proxy, json.dumps({"history": [1]}))[1]["reason"] == "too_short"
    base, _ = proxy
    assert post(base + "/predictions/lstm", json.dumps(ORIGINAL))[0] == 400  # no key: TorchServe's 400


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_methods_other_than_post_get_405(proxy, method):
    # TorchServe itself forecasts for any method: the handler is never told which one was used
    assert post(proxy[1], json.dumps(ORIGINAL), method=method)[0] == 200
    status, answer = through(proxy, json.dumps(ORIGINAL), method=method)
    assert (status, answer["reason"], answer["code"]) == (405, "method_not_allowed", 405)


@pytest.mark.parametrize(("body", "content_type"), [(b"&", "application/x-www-form-urlencoded"),
                                                    (json.dumps(ORIGINAL), "text/plain"),
                                                    (json.dumps(ORIGINAL), None)])
def test_bodies_that_are_not_json_get_415(proxy, body, content_type):
    status, answer = through(proxy, body, content_type)
    assert (status, answer["reason"]) == (415, "not_json")


def test_an_oversized_body_gets_a_json_413_and_unknown_paths_a_json_404(proxy):
    status, answer = through(proxy, json.dumps({"history": [30.123456789] * 200000}))  # 2.8 MB
    assert (status, answer["reason"]) == (413, "too_large")
    for path in ("/explanations/lstm", "/models", "/"):
        status, answer = through(proxy, json.dumps(ORIGINAL), path=path)
        assert (status, answer["reason"]) == (404, "not_found"), path


def closed_after(sockets: list[socket.socket], limit: float) -> list[float | None]:
    """Seconds until the peer closed each socket (None: still open after `limit`)."""
    start, closed = time.monotonic(), [None] * len(sockets)
    for s in sockets:
        s.setblocking(False)
    while time.monotonic() - start < limit and None in closed:
        for i, s in enumerate(sockets):
            if closed[i] is None:
                try:
                    if s.recv(65536) == b"":
                        closed[i] = time.monotonic() - start
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = time.monotonic() - start
        time.sleep(0.05)
    for s in sockets:
        s.close()
    return closed


def test_idle_stalled_and_kept_alive_connections_are_closed_by_the_proxy(proxy):
    base, server = proxy
    host, port = base.removeprefix("http://").split(":")
    ts_port = server.ports[0]
    idle = [socket.create_connection((host, int(port))) for _ in range(500)]
    stalled = socket.create_connection((host, int(port)))  # announces 1,000 bytes, sends 10
    stalled.sendall(b"POST /predictions/lstm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"history\"")
    kept = socket.create_connection((host, int(port)))  # one answered request, then silence
    body = json.dumps(ORIGINAL).encode()
    token = server.token()
    kept.sendall(b"POST /predictions/lstm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + (f"Authorization: Bearer {token}\r\n".encode() if token else b"")
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    direct = socket.create_connection(("127.0.0.1", ts_port))  # TorchServe alone, for comparison
    assert through(proxy, body)[0] == 200  # 500 idle connections cost the others nothing
    waited = closed_after([*idle, stalled, kept, direct], limit=20)
    *idle_s, stalled_s, kept_s, direct_s = waited
    print(f"\nclosed after: idle {max(idle_s):.1f} s (500 of them), stalled body {stalled_s:.1f} s, "
          f"kept alive {kept_s:.1f} s; TorchServe alone: {direct_s}")
    assert all(t is not None and t < 8 for t in idle_s)  # client_header_timeout 5 s
    assert stalled_s is not None and stalled_s < 8  # client_body_timeout 5 s
    assert kept_s is not None and kept_s < 18  # keepalive_timeout 15 s
    assert direct_s is None  # TorchServe 0.12 closes no idle connection: the reason for the proxy
