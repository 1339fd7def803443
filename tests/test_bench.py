"""Reading wrk's report, failing a profile with its reason, and the report written level by level.

No TorchServe here: wrk runs against a tiny local HTTP server where a real wrk is needed."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stockcast import bench
from stockcast.bench import BenchError, Report, bench_levels, parse_wrk, run_profiles, to_ms

REPORT = """Running 5s test @ http://127.0.0.1:41625/predictions/lstm
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   774.64ms  599.47ms   1.76s    72.41%
    Req/Sec    32.91     32.76   100.00     81.82%
  Latency Distribution
     50%  430.05ms
     75%    1.56s 
     90%    1.66s 
     99%    1.76s 
  87 requests in 5.01s, 39.25KB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:     17.37
Transfer/sec:      7.84KB
"""
# a real wrk run against a server that accepts connections and never answers
NOTHING_ANSWERED = """Running 2s test @ http://127.0.0.1:45871/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 2.01s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
"""
ROW = {"requests": 87, "requests_per_s": 17.37, "p50_ms": 430.05, "p90_ms": 1660.0, "p99_ms": 1760.0,
       "errors": 5, "non_2xx": 4}


def test_parse_wrk_reads_requests_rate_percentiles_and_errors():
    assert parse_wrk(REPORT) == ROW


def test_nothing_answered_is_a_failure_not_zero_errors():
    with pytest.raises(BenchError, match="0 requests served: 0 answered"):
        parse_wrk(NOTHING_ANSWERED)


def test_every_answer_an_error_is_a_failure():
    # e.g. a missing token: TorchServe answers every request 400
    all_errors = REPORT.replace("Non-2xx or 3xx responses: 4", "Non-2xx or 3xx responses: 87")
    with pytest.raises(BenchError, match="0 requests served: 87 answered, 87 of them not 2xx, 5 socket"):
        parse_wrk(all_errors)


@pytest.mark.parametrize("garbage", ["", "Segmentation fault\n", REPORT.replace("1.66s", "n/a"),
                                     REPORT.replace("Requests/sec:     17.37\n", "")])
def test_garbage_is_an_unparsable_report(garbage):
    with pytest.raises(BenchError, match="unparsable wrk output"):
        parse_wrk(garbage)


@pytest.mark.parametrize(("text", "ms"), [("812.00us", 0.812), ("4.50ms", 4.5), ("1.20s", 1200.0)])
def test_to_ms(text, ms):
    assert to_ms(text) == pytest.approx(ms)


def test_each_level_is_in_the_report_before_the_next_runs(tmp_path):
    out = tmp_path / "bench.json"
    report = Report(out, seconds_per_level=5)
    seen_on_disk = []

    def measure(connections):
        seen_on_disk.append(json.loads(out.read_text())["http"] if out.exists() else [])
        if connections == 16:
            return {"concurrency": 16, **parse_wrk(NOTHING_ANSWERED)}
        return {"concurrency": connections, **ROW, "log_bytes_per_request": 0.0}

    with pytest.raises(BenchError, match="concurrency 16: 0 requests served"):
        bench_levels("latency", [1, 16, 64], measure, report)
    assert seen_on_disk[1] == [{"profile": "latency", "concurrency": 1, **ROW, "log_bytes_per_request": 0.0}]
    assert len(seen_on_disk) == 2  # 64 never ran
    assert json.loads(out.read_text())["http"] == seen_on_disk[1]


def test_a_failed_profile_is_reported_and_the_next_one_runs(tmp_path):
    out = tmp_path / "bench.json"
    report = Report(out)

    def bench_one(name):
        if name == "baseline":  # served nothing: no ratio over it, and no ZeroDivisionError
            raise BenchError("server did not start: port 8080 in use")
        report.add({"profile": name, "concurrency": 1, **ROW, "log_bytes_per_request": 0.0})

    assert run_profiles(["baseline", "latency"], bench_one, report) == ["baseline"]
    written = json.loads(out.read_text())
    assert written["failed"] == [{"profile": "baseline", "reason": "server did not start: port 8080 in use"}]
    assert [r["profile"] for r in written["http"]] == ["latency"]
    assert not any(k.endswith("_over_baseline") for k in written)


def test_main_exits_non_zero_after_running_every_profile(tmp_path, monkeypatch, capsys):
    for name in ("model.onnx", "model.pt", "meta.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "request.json").write_text('{"history": [1.0]}')
    ran = []

    def fake_profile(name, artifacts, handlers, levels, seconds, payload, tmp, report):
        ran.append(name)
        if name == "baseline":
            raise BenchError("concurrency 1: 0 requests served: 0 answered")
        for c in levels:
            report.add({"profile": name, "concurrency": c, **ROW, "requests_per_s": 10.0 * c,
                        "log_bytes_per_request": 0.0})

    monkeypatch.setattr(bench, "bench_profile", fake_profile)
    monkeypatch.setattr(bench, "time_forward", lambda artifacts: [])
    monkeypatch.setattr(bench.shutil, "which", lambda cmd: "/usr/bin/wrk")
    out = tmp_path / "logs" / "bench.json"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--artifacts", str(tmp_path), "--request", str(tmp_path / "request.json"),
                    "--profiles", "baseline-torchscript,baseline,latency", "--concurrency", "1", "4",
                    "--out", str(out)])
    assert exit_.value.code == 1
    assert ran == ["baseline-torchscript", "baseline", "latency"]
    written = json.loads(out.read_text())
    assert [r["profile"] for r in written["failed"]] == ["baseline"]
    assert len(written["http"]) == 4
    assert written["latency_over_baseline-torchscript"] == {"1": 1.0, "4": 1.0}
    assert "bench: FAILED: baseline" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--profiles", "fastest"], "unknown profile 'fastest'"),
    (["--concurrency", "0"], "not a whole number >= 1"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_artifacts_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*model.onnx is missing: train first"):
        bench.main(["--artifacts", str(tmp_path / "none")])


class Recorder(BaseHTTPRequestHandler):
    """Answers `status` to every POST and keeps what it received."""

    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe
    status = 200
    seen: list[tuple[str | None, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.headers["Authorization"], body))
        self.send_response(self.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    Recorder.seen, Recorder.status = [], 200
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/predictions/lstm"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_sends_the_body_and_the_token(recorder, tmp_path):
    payload = json.dumps({"history": [33.5, 33.9], "note": 'a "quoted" \\ line\n'})
    script = tmp_path / "post.lua"
    script.write_text(bench.wrk_script(payload, {"Authorization": "Bearer k3y"}))
    row = bench.run_wrk(recorder, script, 1, 1)
    assert 0 < row["requests"] <= len(Recorder.seen) and row["non_2xx"] == 0  # + one in flight
    assert set(Recorder.seen) == {("Bearer k3y", payload.encode())}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_a_server_refusing_every_request_fails_the_level(recorder, tmp_path):
    Recorder.status = 400  # what TorchServe answers a request without its token
    script = tmp_path / "post.lua"
    script.write_text(bench.wrk_script("{}", {}))
    with pytest.raises(BenchError, match="0 requests served"):
        bench.run_wrk(recorder, script, 1, 1)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_a_real_profile_with_token_auth_is_measured(artifacts, tmp_path):
    from conftest import ROOT

    out = tmp_path / "bench.json"
    payload = json.dumps(json.loads((ROOT / "examples" / "petr4_request.json").read_text()))
    bench.bench_profile("latency", artifacts, ROOT / "handlers", [2], 1, payload, tmp_path, Report(out))
    config = (tmp_path / "server-latency" / "config.properties").read_text()
    assert "disable_token_authorization=false" in config  # the token was required ...
    [row] = json.loads(out.read_text())["http"]
    assert row["requests"] > 50 and row["non_2xx"] == 0 and row["errors"] == 0  # ... and sent
