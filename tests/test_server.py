"""A real TorchServe (Java frontend + Python workers) on free ports, driven over HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import ROOT, closes, forecast_from_export
from helpers import ORIGINAL, counter, dashboard_metric_names, post, scrape, url

from stockcast.serve import example_curl, free_ports, get, processes, start, stop

pytestmark = pytest.mark.slow

def test_ping(server):
    status, body = get(f"{server.inference}/ping", server.headers())
    assert status == 200 and json.loads(body) == {"status": "Healthy"}


def test_the_original_projects_payload_gets_the_offline_forecast(server, artifacts):
    status, body = post(server, json.dumps(ORIGINAL))
    assert status == 200, body
    expected = forecast_from_export(artifacts, np.array([ORIGINAL["history"]]))[0]
    np.testing.assert_allclose(body["forecast"], expected, rtol=1e-5)
    assert body["prediction"] == body["forecast"][0] and body["window"] == 60


@pytest.mark.parametrize("k", [0.01, 3, 100])
def test_forecast_scales_with_the_history_over_http(server, k):
    history = closes(seed=5)
    _, base = post(server, json.dumps({"history": history.tolist()}))
    _, scaled = post(server, json.dumps({"history": (k * history).tolist()}))
    np.testing.assert_allclose(scaled["forecast"], np.multiply(k, base["forecast"]), rtol=1e-5)


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        ("{not json", "application/json", "invalid_json"),
        ('{"history": [' + "30.0, " * 59 + "NaN]}", "application/json", "not_finite"),
        ('{"history": [' + "30.0, " * 59 + "1e999]}", "application/json", "not_finite"),
        ('{"history": [1, 2, 3]}', "application/json", "too_short"),
        ('{"history": [' + "30.0, " * 59 + '"x"]}', "application/json", "not_number"),
        ("[1, 2]", "application/json", "not_object"),
        (json.dumps(ORIGINAL), None, "empty_body"),  # urllib's default: form-encoded
        (json.dumps(ORIGINAL), "application/x-www-form-urlencoded", "empty_body"),
        ("", "application/json", "empty_body"),
        (b"\xff\xfe\xfd", "application/octet-stream", "invalid_json"),
    ],
)
def test_bad_input_gets_a_json_400_naming_the_problem(server, body, content_type, reason):
    status, answer = post(server, body, content_type)
    assert status == 400, answer
    assert answer["reason"] == reason and answer["error"]
    assert post(server, json.dumps(ORIGINAL))[0] == 200


def test_a_thousand_histories_in_one_call_over_http(server, artifacts):
    """{"instances": [...]} on the plain endpoint: one forecast object (or error object) per
    instance, in order, and a JSON 400 beyond max_instances."""
    histories = closes(batch=1000, seed=11)
    instances = [{"history": h.tolist()} for h in histories]
    instances[500] = {"history": [1.0, 2.0]}
    status, body = post(server, json.dumps({"instances": instances}))
    assert status == 200 and len(body["predictions"]) == 1000
    assert body["predictions"][500]["reason"] == "too_short"
    good = [p["forecast"] for k, p in enumerate(body["predictions"]) if k != 500]
    expected = forecast_from_export(artifacts, np.delete(histories, 500, axis=0))
    np.testing.assert_allclose(good, expected, rtol=1e-5)
    status, body = post(server, json.dumps({"instances": [instances[0]] * 1001}))
    assert (status, body["reason"]) == (400, "too_many_instances") and "1000" in body["message"]
    # 1,000 refused instances: a 200 whose list arrives whole (a 4xx of ~160 KB was cut short)
    status, body = post(server, json.dumps({"instances": [{"history": [1.0, 2.0]}] * 1000}))
    assert status == 200 and [p["reason"] for p in body["predictions"]] == ["too_short"] * 1000


def test_an_oversized_body_is_refused_with_413(server):
    import socket

    size = 2 * 1024 * 1024 + 1  # one byte over max_request_size
    host, port = server.inference.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        # headers only: TorchServe refuses on Content-Length alone and closes the connection; a
        # client still sending the body then races the close and may see a reset instead
        conn.sendall(f"POST /predictions/lstm HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {size}\r\n\r\n".encode())
        status_line = conn.makefile("rb").readline().decode()
    assert status_line.split()[1] == "413", status_line
    assert post(server, json.dumps(ORIGINAL))[0] == 200


def test_metrics_count_forecasts_and_rejections_by_model_version(server, artifacts):
    before = scrape(server)
    good, bad = 7, 3
    answers = []
    time.sleep(1.1)  # IntervalWidth takes at most one value a second per worker: a fresh second
    for i in range(good):
        status, answer = post(server, json.dumps({"history": closes(seed=i).tolist()}))
        assert status == 200
        answers.append({**answer, "last": closes(seed=i)[-1]})
    for _ in range(bad):
        assert post(server, '{"history": [1]}')[0] == 400
    after = scrape(server)

    def delta(name, **labels):
        return counter(after, name, **labels) - counter(before, name, **labels)

    assert delta("ForecastsServed", ModelName="lstm") == good
    # which model answered: the registry's version, also on the rejections
    version = json.loads((artifacts / "meta.json").read_text())["version"]
    assert delta("ForecastsServed", ModelName="lstm", ModelVersion=version) == good
    assert delta("RequestsRejected", ModelVersion=version, Reason="too_short") == bad
    assert delta("RequestsRejected", ModelName="lstm", Reason="too_short") == bad
    assert delta("RequestsRejected", ModelName="lstm") == bad
    assert delta("ts_inference_requests_total", model_name="lstm") == good + bad
    # the frontend counts every answer on every port: +1 for the `before` scrape itself
    assert delta("Requests2XX") == good + 1 and delta("Requests4XX") == bad
    assert delta("ts_inference_latency_microseconds", model_name="lstm") > 0
    # the gauge holds a recent batch's mean interval width in % of the last close (at most one
    # value a second per worker): one of the answers' widths
    for k, level in enumerate(("80", "95")):
        widths = [100 * (a["intervals"][k]["upper"][0] - a["intervals"][k]["lower"][0]) / a["last"]
                  for a in answers]
        gauge = counter(after, "IntervalWidth", Interval=level, ModelVersion=version)
        assert min(abs(gauge - w) for w in widths) < 1e-3, (gauge, widths)


def test_every_dashboard_metric_exists_in_a_real_scrape(server):
    post(server, json.dumps(ORIGINAL))
    text = scrape(server)
    declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    # a histogram is declared once and queried by its _bucket series; up and ALERTS are Prometheus' own;
    # stockcast_* is what the refresh pushes to the Pushgateway (test_quality.py checks those)
    queried = {re.sub(r"_bucket$", "", name) for name in dashboard_metric_names()
               if not name.startswith("stockcast_")} - {"up", "ALERTS"}
    assert queried <= declared, queried - declared
    deadline = time.monotonic() + 90  # system metrics are collected once a minute
    while counter(text, "MemoryUsed") == 0 and time.monotonic() < deadline:
        time.sleep(2)
        text = scrape(server)
    assert counter(text, "MemoryUsed") > 0 and "CPUUtilization{" in text


def test_the_printed_curl_works_as_printed(server):
    command = example_curl(server)
    proc = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and json.loads(proc.stdout)["forecast"]


def test_registering_a_model_over_http_is_refused(server):
    request = urllib.request.Request(f"{server.management}/models?url=lstm.mar", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code in (400, 403, 405)


def test_with_token_auth_on_a_request_needs_the_key_and_stop_leaves_nothing(mar, tmp_path):
    srv = start(mar.parent, tmp_path / "ts", handlers=ROOT / "handlers", ports=free_ports(),
                token_auth=True)
    try:
        assert len(list(processes(srv.pid))) >= 4  # launcher, java, two workers
        status, _ = post(url(srv), json.dumps(ORIGINAL))
        assert status == 400  # TorchServe answers a missing key with 400, not 401
        status, _ = post(url(srv), json.dumps(ORIGINAL), headers={"Authorization": "Bearer nope"})
        assert status == 400
        status, body = post(url(srv), json.dumps(ORIGINAL), headers=srv.headers())
        assert status == 200 and body["forecast"]
        assert "Authorization: Bearer" in example_curl(srv)
    finally:
        stop(srv)
    assert list(processes(srv.pid)) == []
    with pytest.raises(OSError):
        get(f"{srv.inference}/ping", timeout=1)


def test_the_serve_command_is_idempotent_and_reloads_a_changed_archive(artifacts, tmp_path):
    from stockcast.package import PROFILES, build_archive

    store, home = tmp_path / "store", tmp_path / "home"
    build_archive(artifacts, store, handlers=ROOT / "handlers")
    ports = [str(p) for p in free_ports()]

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "stockcast.serve", *args, "--home", str(home),
                               "--model-store", str(store), "--ports", *ports],
                              cwd=ROOT, capture_output=True, text=True, timeout=180)

    try:
        first = serve("start")
        assert first.returncode == 0 and "TorchServe is serving lstm" in first.stdout, first.stderr
        served = (store / "lstm.mar").read_bytes()
        (store / "lstm.mar").unlink()
        time.sleep(1.1)  # the archiver stamps MANIFEST.json to the second
        build_archive(artifacts, store, handlers=ROOT / "handlers")  # the same artifacts again
        assert (store / "lstm.mar").read_bytes() != served
        again = serve("start")  # same content, other bytes: no restart
        assert again.returncode == 0 and "already serving these archives" in again.stdout, again.stdout
        build_archive(artifacts, store, handlers=ROOT / "handlers", overrides=PROFILES["latency"])
        changed = serve("start")
        # another profile, the same version: TorchServe registers one archive per version
        assert ("lstm.mar changed but keeps version" in changed.stdout
                and "restarting it" in changed.stdout), changed.stdout
        status = serve("status")
        assert status.returncode == 0 and f"127.0.0.1:{ports[0]}/predictions/lstm" in status.stdout
        record = json.loads((home / "server.json").read_text())
        key = json.loads((home / "key_file.json").read_text())["management"]["key"]
        code, body = get(f"http://127.0.0.1:{ports[1]}/models/lstm", {"Authorization": f"Bearer {key}"})
        # the latency archive: no batching wait, honoured through the model_snapshot (load_models
        # would read 0 as 100 ms)
        assert code == 200 and json.loads(body)[0]["maxBatchDelay"] == 0, body
    finally:
        serve("stop")
    assert processes(record["pid"]) == {} and serve("status").returncode != 0


def test_every_error_a_client_can_get_has_torchserves_shape_and_ours_a_reason(server):
    """The README's status table: TorchServe's {code, type, message}, ours adds error and reason."""
    base = server.inference
    cases = {  # name -> ((status, type, reason or None), the answer)
        "ours": ((400, "BadRequest", "too_short"), post(server, '{"history": [1]}')),
        "explanations": ((404, "NotFound", "no_explanations"),
                         post(f"{base}/explanations/lstm", json.dumps(ORIGINAL), headers=server.headers())),
        "another model": ((404, "ModelNotFoundException", None),
                          post(f"{base}/predictions/nope", json.dumps(ORIGINAL), headers=server.headers())),
    }
    if server.token():  # token auth on, the default
        cases["no key"] = ((400, "InvalidKeyException", None), post(url(server), json.dumps(ORIGINAL)))
    for name, ((status, kind, reason), (got, answer)) in cases.items():
        assert got == status and answer["code"] == status and answer["type"] == kind, (name, answer)
        assert answer["message"], name
        if reason:
            assert answer["reason"] == reason and answer["error"] == answer["message"], name
