"""Reading wrk's report, failing a profile with its reason, the report written level by level, the
many-per-call bodies, the comparison with the peer, and (slow) the peer against a real TorchServe.

The fast tests start no server: wrk runs against a tiny local HTTP server where a real wrk is needed."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from stockcast import bench, bench_peer
from stockcast.bench import BenchError, Plan, Report, bench_levels, many_body, parse_wrk, run_profiles, to_ms
from stockcast.serve import free_ports, processes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = json.loads((ROOT / "examples" / "petr4_request.json").read_text())

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

    def fake_profile(name, artifacts, handlers, plan, tmp, report):
        ran.append(name)
        if name == "baseline":
            raise BenchError("concurrency 1: 0 requests served: 0 answered")
        for c in plan.levels:
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


def test_by_default_the_shipped_profiles_and_the_peer_run_with_a_thousand_per_call(tmp_path, monkeypatch):
    for name in ("model.onnx", "model.pt", "meta.json"):
        (tmp_path / name).write_text("{}")
    plans = {}
    monkeypatch.setattr(bench, "bench_profile", lambda name, a, h, plan, t, r: plans.setdefault(name, plan))
    monkeypatch.setattr(bench, "time_forward", lambda artifacts: [])
    monkeypatch.setattr(bench.shutil, "which", lambda cmd: "/usr/bin/wrk")
    common = ["--artifacts", str(tmp_path), "--request", str(ROOT / "examples" / "petr4_request.json")]
    bench.main([*common, "--out", str(tmp_path / "a.json")])
    assert list(plans) == ["throughput", "latency", "peer"]
    plan = plans["peer"]
    assert plan.levels == [1, 16, 64] and plan.instances == 1000
    assert len(json.loads(plan.many)["instances"]) == 1000 and json.loads(plan.payload) == EXAMPLE
    plans.clear()
    bench.main([*common, "--many", "0", "--profiles", "baseline,peer", "--out", str(tmp_path / "b.json")])
    assert list(plans) == ["baseline", "peer"] and (plans["peer"].instances, plans["peer"].many) == (0, "")


@pytest.mark.parametrize(("args", "message"), [
    (["--profiles", "fastest"], "unknown profile 'fastest'"),
    (["--concurrency", "0"], "not a whole number >= 1"),
    (["--many", "-1"], "not a whole number >= 0"),
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
    out = tmp_path / "bench.json"
    plan = Plan([2], 1, json.dumps(EXAMPLE), 10, many_body(EXAMPLE, 10))
    bench.bench_profile("latency", artifacts, ROOT / "handlers", plan, tmp_path, Report(out))
    config = (tmp_path / "server-latency" / "config.properties").read_text()
    assert "disable_token_authorization=false" in config  # the token was required ...
    row, *many = json.loads(out.read_text())["http"]
    assert row["requests"] > 50 and row["non_2xx"] == 0 and row["errors"] == 0  # ... and sent
    assert [(r["concurrency"], r["instances"]) for r in many] == [(1, 10), (2, 10), (4, 10)]
    assert all(r["requests"] > 5 and r["non_2xx"] == r["errors"] == 0 for r in many)


def test_the_many_body_holds_n_distinct_valid_histories():
    body = many_body(EXAMPLE, 50)
    instances = json.loads(body)["instances"]
    histories = np.array([x["history"] for x in instances])  # [50, 60]
    assert all(list(x) == ["history"] for x in instances) and histories.shape == (50, len(EXAMPLE["history"]))
    assert len({tuple(h) for h in histories}) == 50  # no two alike
    assert np.isfinite(histories).all() and (histories > 0).all()
    np.testing.assert_allclose(histories[0], EXAMPLE["history"], rtol=1e-6)
    # each a scaled copy: the same returns, so as plausible to the handler as the original
    returns = np.diff(np.log(histories), axis=1)
    np.testing.assert_allclose(returns, np.broadcast_to(returns[0], returns.shape), atol=1e-5)
    assert " " not in body  # compact: 1,000 histories stay well under TorchServe's 2 MB limit


def test_the_default_many_body_fits_the_shipped_request_limit(tmp_path):
    assert len(many_body(EXAMPLE, 1000).encode()) <= bench.max_request_size(ROOT / "handlers")
    (tmp_path / "config.properties").write_text("inference_address=http://127.0.0.1:8080\n")
    assert bench.max_request_size(tmp_path) == 6553500  # TorchServe's own default


def test_a_body_over_the_request_limit_fails_with_the_reason_before_sending():
    with pytest.raises(BenchError, match=r"1000 per call: the body is [\d,]+ bytes, over TorchServe's "
                                         r"max_request_size of 100,000"):
        bench.check_many("http://127.0.0.1:9/never", {}, many_body(EXAMPLE, 1000), 1000, 100_000)


@pytest.mark.parametrize(("status", "reason"), [(400, "answered 400 with 0 of 3"),
                                                (200, "answered 200 with 0 of 3 forecasts")])
def test_a_server_not_answering_every_instance_fails_the_many_levels(recorder, status, reason):
    Recorder.status = status  # e.g. a handler without {"instances": [...]}, or one ignoring it
    with pytest.raises(BenchError, match=f"3 per call: {reason}"):
        bench.check_many(recorder, {"Authorization": "Bearer k"}, many_body(EXAMPLE, 3), 3, 2_000_000)
    assert Recorder.seen == [("Bearer k", many_body(EXAMPLE, 3).encode())]


def canned(profile: str, c: int, rate: float, p99: float, n: int = 1) -> dict:
    row = {"profile": profile, "concurrency": c, "instances": n, **ROW, "requests_per_s": rate,
           "p99_ms": p99, "log_bytes_per_request": 0.0}
    return {**row, "forecasts_per_s": rate * n} if n > 1 else row


CANNED = [canned("throughput", 1, 300.0, 6.0), canned("throughput", 16, 4000.0, 13.0),
          canned("peer", 1, 2000.0, 0.9), canned("peer", 16, 3200.0, 25.0),
          canned("throughput", 1, 20.0, 80.0, n=1000), canned("peer", 1, 16.0, 90.0, n=1000),
          canned("throughput", 2, 30.0, 95.0, n=1000),  # the peer has no c2 row: no comparison
          canned("baseline", 16, 1000.0, 40.0), canned("peer", 64, 0.0, 0.0)]


def test_each_shipped_profile_against_the_peer_at_each_level_both_measured():
    assert bench.vs_peer(CANNED) == [
        {"profile": "throughput", "concurrency": 1, "instances": 1, "requests_per_s_ratio": 0.15,
         "p99_ms": 6.0, "peer_p99_ms": 0.9},
        {"profile": "throughput", "concurrency": 16, "instances": 1, "requests_per_s_ratio": 1.25,
         "p99_ms": 13.0, "peer_p99_ms": 25.0},
        {"profile": "throughput", "concurrency": 1, "instances": 1000, "requests_per_s_ratio": 1.25,
         "p99_ms": 80.0, "peer_p99_ms": 90.0}]
    assert bench.ratios(CANNED) == {"throughput_over_baseline": {16: 4.0}}  # many rows only over many rows


def test_the_report_and_the_table_carry_the_peer_comparison_and_forecasts_per_second(tmp_path):
    report = Report(tmp_path / "bench.json")
    for row in CANNED[:6]:
        report.add(row)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["concurrency"], r["instances"]) for r in written["vs_peer"]] == [(1, 1), (16, 1), (1, 1000)]
    single, many = bench.format_row(CANNED[0]).split(), bench.format_row(CANNED[4]).split()
    assert single[:4] == ["throughput", "1", "1", "300"] and len(single) == len(many) - 1
    assert many[:5] == ["throughput", "1", "1000", "20", "20000"]  # forecasts/s = req/s x N
    assert bench.HEADER.split()[:5] == ["profile", "c", "N", "req/s", "forecasts/s"]


@pytest.fixture(scope="module")
def peer(artifacts, tmp_path_factory):
    """The peer serving the same artifacts as conftest's `server`, stopped whatever the tests do."""
    with bench_peer.serving(artifacts, tmp_path_factory.mktemp("peer"), free_ports(1)[0]) as running:
        yield running


def assert_same_forecast(ours: dict, theirs: dict) -> None:
    """The same JSON shape, the same labels, every number within 1e-6 relative."""
    labels = ("window", "horizon", "model")
    assert theirs.keys() == ours.keys() >= {"prediction", "forecast", "intervals", *labels}
    assert [theirs[k] for k in labels] == [ours[k] for k in labels]
    assert [i["level"] for i in theirs["intervals"]] == [i["level"] for i in ours["intervals"]]

    def numbers(x: dict) -> list[float]:
        bounds = (v for i in x["intervals"] for v in i["lower"] + i["upper"])
        return [x["prediction"], *x["forecast"], *bounds]

    np.testing.assert_allclose(numbers(theirs), numbers(ours), rtol=1e-6)


@pytest.mark.slow
def test_the_peer_forecasts_what_our_handler_does(server, peer):
    from helpers import post

    status, ours = post(server, json.dumps(EXAMPLE))
    assert status == 200, ours
    status, theirs = post(f"{peer.inference}/predictions/lstm", json.dumps(EXAMPLE))
    assert status == 200, theirs
    assert_same_forecast(ours, theirs)
    body = many_body(EXAMPLE, 5)
    (status, ours), (peer_status, theirs) = post(server, body), post(f"{peer.inference}/predictions/lstm",
                                                                      body)
    assert (status, peer_status) == (200, 200) and len(theirs["predictions"]) == 5
    for mine, its in zip(ours["predictions"], theirs["predictions"], strict=True):
        assert_same_forecast(mine, its)


@pytest.mark.slow
@pytest.mark.parametrize("body", ["{}", '{"history": [33.1, 33.2]}', json.dumps({"history": ["x"] * 60}),
                                  "not json", json.dumps({"instances": [EXAMPLE, {"history": None}]})])
def test_the_peer_refuses_a_missing_short_or_non_numeric_history_with_a_json_400(peer, body):
    from helpers import post

    status, answer = post(f"{peer.inference}/predictions/lstm", body)
    assert status == 400 and answer["code"] == 400 and answer["message"]


@pytest.mark.slow
def test_the_peer_is_stopped_by_its_process_group_even_when_the_block_fails(artifacts, tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"):
        with bench_peer.serving(artifacts, tmp_path, free_ports(1)[0]) as running:
            group = running.proc.pid
            assert len(processes(group)) >= 3  # the supervisor and its two workers
            raise RuntimeError("the test failed")
    assert processes(group) == {}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_a_peer_run_measures_one_and_many_per_call_and_stops_the_peer(artifacts, tmp_path, monkeypatch):
    started, real_start = [], bench_peer.start
    monkeypatch.setattr(bench_peer, "start", lambda *a: started.append(real_start(*a)) or started[-1])
    out = tmp_path / "bench.json"
    plan = Plan([2], 1, json.dumps(EXAMPLE), 10, many_body(EXAMPLE, 10))
    bench.bench_profile("peer", artifacts, ROOT / "handlers", plan, tmp_path, Report(out))
    rows = json.loads(out.read_text())["http"]
    assert [(r["concurrency"], r["instances"]) for r in rows] == [(2, 1), (1, 10), (2, 10), (4, 10)]
    assert all(r["requests"] > 5 and r["non_2xx"] == r["errors"] == 0 for r in rows)
    assert rows[1]["forecasts_per_s"] == pytest.approx(rows[1]["requests_per_s"] * 10, abs=0.1)
    assert processes(started[0].proc.pid) == {}
