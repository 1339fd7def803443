"""The soak's sampling and verdict, against a tiny local HTTP server (no TorchServe)."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stockcast import soak
from stockcast.serve import Server


def sample(t, frontend_mb=300.0, workers_mb=200.0, requests=1000, errors=0, p99_ms=4.0):
    return {"t_s": t, "requests": requests, "errors": errors, "p50_ms": 2.0, "p99_ms": p99_ms,
            "frontend_mb": frontend_mb, "workers_mb": workers_mb}


def test_one_sample_gives_no_verdict():
    result = soak.verdict([sample(0)])
    assert result["memory_flat"] is None
    assert result["verdict"].startswith("not enough samples: 0 after the warm-up one, need 4")


def test_too_few_samples_after_the_warm_up_give_no_verdict():
    result = soak.verdict([sample(5 * k) for k in range(soak.MIN_SAMPLES)])
    assert result["memory_flat"] is None and "not enough samples: 3" in result["verdict"]
    assert result["requests"] == 4000  # what was sent is still reported


def test_flat_and_drifting_memory_after_the_warm_up():
    # the warm-up sample's memory is ignored: the server is still loading there
    steady = [sample(0, frontend_mb=100.0)] + [sample(5 * k, 300.0 + k) for k in range(1, 6)]
    flat = soak.verdict(steady)
    assert flat["memory_flat"] is True and flat["verdict"] == "flat"
    assert flat["start"]["t_s"] == 5 and flat["end"]["t_s"] == 25
    growing = steady[:-1] + [sample(25, workers_mb=240.0)]
    drifted = soak.verdict(growing)
    assert drifted["memory_flat"] is False and drifted["memory_drift"]["workers_mb"] == 0.2


def test_a_vanished_process_gives_no_verdict():
    result = soak.verdict([sample(5 * k) for k in range(5)] + [sample(25, workers_mb=0.0)])
    assert result["memory_flat"] is None and result["verdict"] == "no workers process to measure"


class Forecasts(BaseHTTPRequestHandler):
    """Answers every POST with a forecast, once it sees the token."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        ok = self.headers["Authorization"] == "Bearer k3y"
        body = json.dumps({"forecast": [33.5]} if ok else {"code": 400}).encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """A Server whose inference port is a local HTTP server with a token; its 'processes' are
    this test's own, so memory readings are real and steady."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Forecasts)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k3y"}}))
    monkeypatch.setattr(soak, "server_processes",
                        lambda server: {"frontend": [os.getpid()], "workers": [os.getpid()]})
    yield Server(tmp_path, os.getpid(), (httpd.server_address[1], 0, 0, 0, 0))
    httpd.shutdown()
    httpd.server_close()


def test_run_samples_every_period_with_the_token(fake_server):
    summaries = soak.run(fake_server, seconds=3, rate=40, body=b'{"history": [1]}', every=0.5,
                         log=lambda _: None)
    assert 5 <= len(summaries) <= 6  # 3 s in periods of 0.5 s: the short last one is dropped
    assert [round(s["t_s"] * 2) / 2 for s in summaries] == [0.5 * k for k in range(len(summaries))]
    assert all(s["errors"] == 0 and s["requests"] >= 10 and s["frontend_mb"] > 0 for s in summaries)
    assert soak.verdict(summaries)["memory_flat"] is True


@pytest.mark.parametrize(("args", "message"), [
    (["--minutes", "0.1"], "6 s holds fewer than 5 samples of 5 s"),
    (["--every", "0"], "must be positive"),
])
def test_a_soak_too_short_for_a_verdict_is_refused_before_it_starts(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        soak.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
