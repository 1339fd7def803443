"""The TorchServe handler, loaded from a real .mar by TorchServe's own loader, with no server."""

from __future__ import annotations

import json
import logging
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT, closes, forecast_from_export, quantiles_from_export
from hypothesis import given, settings
from hypothesis import strategies as st
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import TsModelLoader
from ts.service import Service

from stockcast.data import Windows
from stockcast.features import to_inputs

GOOD = {"history": closes().tolist()}


def load_service(model_dir):
    """What a TorchServe worker does with an unpacked archive."""
    sys.path.insert(0, str(model_dir))  # the worker imports the handler from the model dir
    try:
        metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "handlers" / "metrics.yaml"))
        metrics.initialize_cache()
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        return TsModelLoader().load("lstm", str(model_dir), manifest["model"]["handler"],
                                           None, 8, metrics_cache=metrics)
    finally:
        sys.path.remove(str(model_dir))
        sys.modules.pop("forecast_handler", None)
        sys.modules.pop("stockcast_features", None)  # the archive's copy, imported by the handler


@pytest.fixture(scope="module")
def model_dir(mar, tmp_path_factory):
    folder = tmp_path_factory.mktemp("unpacked")
    zipfile.ZipFile(mar).extractall(folder)
    return folder


@pytest.fixture(scope="module")
def service(model_dir):
    return load_service(model_dir)


def predict(service, *bodies, content_type="application/json", raw=False):
    """Send one batch through the handler as TorchServe would: [(status, response), ...]. Bodies go
    as bytes, which is how TorchServe hands over a body it does not decode (the handler's setting);
    raw=True passes them as given (a dict, as TorchServe's JSON decoding would make it, or a str)."""
    def wire(body):
        if raw or isinstance(body, (bytes, bytearray)):
            return body
        return (body if isinstance(body, str) else json.dumps(body)).encode()

    batch = [{"requestId": f"r{i}".encode(), "parameters": [
        {"name": "body", "contentType": content_type, "value": wire(body)}]} for i, body in enumerate(bodies)]
    headers, inputs, ids = Service.retrieve_data_for_inference(batch)
    ctx = service.context
    ctx.request_ids, ctx.request_processor, ctx.metrics.request_ids = ids, headers, ids
    out = service._entry_point(inputs, ctx)
    assert isinstance(out, list) and len(out) == len(bodies)  # else TorchServe answers 503
    if not raw:  # compact JSON bytes, as sent (TorchServe's own encoding of objects indents them)
        assert all(isinstance(o, bytes) and b"\n" not in o for o in out)
    return [(ctx.get_response_status(i)[0], json.loads(o) if isinstance(o, bytes) else o)
            for i, o in enumerate(out)]


def test_forecast_equals_the_exported_model_driven_directly(service, artifacts):
    [(status, body)] = predict(service, GOOD)
    assert status == 200
    expected = forecast_from_export(artifacts, np.array([GOOD["history"]]))[0]
    np.testing.assert_allclose(body["forecast"], expected, rtol=1e-5)
    assert body["prediction"] == body["forecast"][0]
    assert body["window"] == 60 and body["horizon"] == 1
    # the registry's version of the model, which make package gives the archive: which model answered
    version = json.loads((artifacts / "meta.json").read_text())["version"]
    assert body["model"] == {"name": "lstm", "ticker": "PETR4.SA", "version": version} and version.isdigit()
    json.dumps(body, allow_nan=False)  # plain JSON, no numpy types or NaN


def test_body_as_dict_string_or_bytes_gives_the_same_forecast(service):
    text = json.dumps(GOOD)
    answers = predict(service, GOOD, text, text.encode(), bytearray(text.encode()), raw=True)
    assert [s for s, _ in answers] == [200] * 4
    assert len({json.dumps(b["forecast"]) for _, b in answers}) == 1


def test_only_the_last_window_closes_are_used(service):
    long = closes(200).tolist()
    [(_, a)], [(_, b)] = predict(service, {"history": long}), predict(service, {"history": long[-60:]})
    assert a["forecast"] == b["forecast"]


@pytest.mark.parametrize("k", [0.01, 3, 100])
def test_forecast_and_intervals_scale_with_the_history(service, k):
    [(_, base)], [(_, scaled)] = predict(service, GOOD), predict(
        service, {"history": [k * x for x in GOOD["history"]]})
    np.testing.assert_allclose(scaled["forecast"], np.multiply(k, base["forecast"]), rtol=1e-5)
    for a, b in zip(base["intervals"], scaled["intervals"], strict=True):
        assert a["level"] == b["level"]
        for side in ("lower", "upper"):
            np.testing.assert_allclose(b[side], np.multiply(k, a[side]), rtol=1e-5)


def test_intervals_are_the_lightning_models_quantiles(service, artifacts):
    """The served 80% and 95% intervals are the quantiles of the model that training evaluated
    (its val-best checkpoint), through the exported file and the archive's transform."""
    from stockcast.model import LSTMForecaster
    from stockcast.training import predict as lightning_predict

    meta = json.loads((artifacts / "meta.json").read_text())
    assert meta["levels"] == [0.025, 0.1, 0.5, 0.9, 0.975]
    root = artifacts.parent.parent
    forecaster = LSTMForecaster.load_from_checkpoint(root / meta["run_dir"] / meta["checkpoint"])

    class Scaler:  # scaler.json as the fitted StandardScaler's attributes
        mean_ = np.array(json.loads((artifacts / "scaler.json").read_text())["mean"])
        scale_ = np.array(json.loads((artifacts / "scaler.json").read_text())["scale"])

    history = closes(batch=3, seed=5)
    x = ((np.diff(np.log(history), axis=1) - Scaler.mean_[0]) / Scaler.scale_[0])[..., None]
    windows = Windows(x.astype(np.float32), None, history[:, -1], None, None)
    point, quantiles = lightning_predict(forecaster.net, windows, Scaler())
    answers = predict(service, *({"history": h.tolist()} for h in history))
    for (status, body), q, p in zip(answers, quantiles, point, strict=True):
        assert status == 200
        assert [iv["level"] for iv in body["intervals"]] == [0.8, 0.95]
        np.testing.assert_allclose(body["forecast"], p, rtol=1e-5)
        eighty, ninety_five = body["intervals"]
        np.testing.assert_allclose([eighty["lower"], eighty["upper"]], q[:, [1, 3]].T, rtol=1e-5)
        np.testing.assert_allclose([ninety_five["lower"], ninety_five["upper"]], q[:, [0, 4]].T, rtol=1e-5)
        # nested and around the point: 95% lower < 80% lower < point < 80% upper < 95% upper
        assert ninety_five["lower"][0] < eighty["lower"][0] < p[0] < eighty["upper"][0] < ninety_five["upper"][0]
    np.testing.assert_allclose(quantiles, quantiles_from_export(artifacts, history), rtol=1e-5)


def history_with(value, at: int = 17) -> dict:
    history = closes().tolist()
    history[at] = value
    return {"history": history}


BAD = {
    "empty string": ("", "empty_body"),
    "empty bytes": (b"", "empty_body"),
    "no body (form-encoded)": (None, "empty_body"),
    "not JSON": ("{history: [1, 2", "invalid_json"),
    "not UTF-8": (b"\xff\xfe\x00", "invalid_json"),
    "deeply nested": ("[" * 100000 + "]" * 100000, "invalid_json"),
    "a list": ([1, 2, 3], "not_object"),
    "a number": ("42", "not_object"),
    "a string": ('"history"', "not_object"),
    "null": ("null", "empty_body"),
    "missing history": ({"closes": GOOD["history"]}, "missing_history"),
    "history a string": ({"history": "1,2,3"}, "not_list"),
    "history an object": ({"history": {"0": 1}}, "not_list"),
    "history null": ({"history": None}, "not_list"),
    "too few": ({"history": GOOD["history"][:59]}, "too_short"),
    "empty history": ({"history": []}, "too_short"),
    "too many": ({"history": closes(10001).tolist()}, "too_long"),
    "a string value": (history_with("30.5"), "not_number"),
    "a null value": (history_with(None), "not_number"),
    "a boolean value": (history_with(True), "not_number"),
    "a nested list": (history_with([30.5]), "not_number"),
    "an object value": (history_with({"close": 30.5}), "not_number"),
    "NaN": ('{"history": [' + "30.1, " * 30 + "NaN, " + "30.2, " * 29 + "30.3]}", "not_finite"),
    "Infinity": ('{"history": [' + "30.1, " * 59 + "-Infinity]}", "not_finite"),
    "overflow 1e999": ('{"history": [' + "30.1, " * 59 + "1e999]}", "not_finite"),
    "an integer too large for a float": (
        '{"history": [' + "30.1, " * 59 + "1" * 400 + "]}", "not_finite"),
    "zero": (history_with(0), "not_positive"),
    "negative": (history_with(-3.5), "not_positive"),
    "the largest float": ({"history": [sys.float_info.max] * 60}, "implausible_price"),
    "the smallest float": ({"history": [5e-324] * 60}, "implausible_price"),
    "a 3:1 split left unadjusted": (
        {"history": closes()[:30].tolist() + (closes()[30:] / 3).tolist()}, "implausible_move"),
    "a typo: 10x": (history_with(300.0, at=30), "implausible_move"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_a_400_naming_the_problem(service, name):
    body, reason = BAD[name]
    [(status, answer)] = predict(service, body)
    assert status == 400, answer
    assert answer["reason"] == reason and answer["code"] == 400
    assert len(answer["error"]) > 10
    # a superset of TorchServe's own error shape {code, type, message}
    assert answer["type"] == "BadRequest" and answer["message"] == answer["error"]
    [(status, _)] = predict(service, GOOD)  # and the worker goes on serving
    assert status == 200


def test_implausible_moves_and_prices_name_the_index(service):
    history = closes(seed=2).tolist()
    history[41] = history[40] * 2.1
    [(_, answer)] = predict(service, {"history": history})
    assert answer["reason"] == "implausible_move" and answer["error"].startswith("history[41] = ")
    [(_, answer)] = predict(service, history_with(2e9, at=7))
    assert answer["reason"] == "implausible_price" and answer["error"].startswith("history[7] = ")


@pytest.mark.parametrize("k", [0.01, 0.1, 1, 10, 100])
def test_the_bounds_are_on_moves_so_every_accepted_history_scales(service, k):
    """The largest accepted move (just under the bound) at any price level k."""
    history = closes(seed=4).tolist()
    history[50] = history[49] * 1.99  # log move 0.688 < 0.69
    history[51] = history[50] * 0.502
    [(status, base)] = predict(service, {"history": history})
    [(status_k, scaled)] = predict(service, {"history": [k * x for x in history]})
    assert status == status_k == 200, (base, scaled)
    np.testing.assert_allclose(scaled["forecast"], np.multiply(k, base["forecast"]), rtol=1e-5)


def test_an_unexpected_failure_is_a_500_for_that_request_alone_and_logged_once(
        service, monkeypatch, caplog):
    handler = service._entry_point.__self__
    real_days = handler.days
    poison = {"history": closes(seed=9).tolist(), "poison": True}

    def days(body):
        if body.get("poison"):
            raise ZeroDivisionError("a bug")
        return real_days(body)

    monkeypatch.setattr(handler, "days", days)
    with caplog.at_level(logging.ERROR):
        answers = predict(service, GOOD, poison, GOOD, poison)
    assert [s for s, _ in answers] == [200, 500, 200, 500]
    assert answers[1][1] == {"code": 500, "type": "InternalServerError", "reason": "internal_error",
                             "message": "internal error while forecasting",
                             "error": "internal error while forecasting"}
    assert answers[0][1]["forecast"] == predict(service, GOOD)[0][1]["forecast"]
    logged = [r for r in caplog.records if "a request failed" in r.getMessage()]
    assert len(logged) <= 1 and all(r.exc_info for r in logged)  # once per kind, per worker


def test_a_batch_forward_that_fails_is_retried_one_by_one(service, monkeypatch):
    handler = service._entry_point.__self__
    real_forecast = handler.forecast

    def forecast(rows):
        if (rows > 1000).any():
            raise FloatingPointError("a row the model cannot take")
        return real_forecast(rows)

    monkeypatch.setattr(handler, "forecast", forecast)
    big = {"history": [2000.0 + i for i in range(60)]}
    answers = predict(service, GOOD, big, GOOD)
    assert [s for s, _ in answers] == [200, 500, 200]


def test_explanations_are_not_forecasts(service):
    batch = [{"requestId": b"r0", "headers": [{"name": b"explain", "value": b"True"}],
              "parameters": [{"name": "body", "contentType": "application/json",
                              "value": json.dumps(GOOD).encode()}]}]
    headers, inputs, ids = Service.retrieve_data_for_inference(batch)
    ctx = service.context
    ctx.request_ids, ctx.request_processor, ctx.metrics.request_ids = ids, headers, ids
    [answer] = service._entry_point(inputs, ctx)
    assert (ctx.get_response_status(0)[0], json.loads(answer)["reason"]) == (404, "no_explanations")


def test_error_messages_name_the_position_and_the_minimum(service):
    [(_, a)], [(_, b)] = predict(service, history_with("x", at=5)), predict(service, {"history": [1]})
    assert a["error"] == "history[5] is not a number but a string"
    assert b["error"] == '"history" needs at least 60 closes, got 1'


def test_a_bad_request_in_a_batch_fails_alone(service):
    other = {"history": closes(seed=3).tolist()}
    answers = predict(service, GOOD, {"history": [1, 2]}, other, "nonsense")
    assert [s for s, _ in answers] == [200, 400, 200, 400]
    [(_, alone)] = predict(service, other)
    assert answers[2][1]["forecast"] == alone["forecast"]
    assert answers[0][1]["forecast"] != alone["forecast"]


def test_counters_are_emitted_with_the_model_version_and_the_rejection_reason(service, artifacts, caplog):
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        predict(service, GOOD, {"history": [1]}, GOOD, {"history": [1]})
    lines = [r.getMessage().removeprefix("[METRICS]") for r in caplog.records]
    version = json.loads((artifacts / "meta.json").read_text())["version"]
    served = f"ForecastsServed.Count:2|#ModelName:lstm,Level:Model,ModelVersion:{version}|"
    # one line per metric and reason per batch, whatever the number of requests (~0.1 ms each)
    rejected = (f"RequestsRejected.Count:2|#ModelName:lstm,Level:Model,ModelVersion:{version},"
                "Reason:too_short|")
    assert sum(m.startswith(served) for m in lines) == 1
    assert sum(m.startswith(rejected) for m in lines) == 1
    # the served intervals' mean width in % of the last close, one gauge per nominal level
    handler = service._entry_point.__self__
    handler.width_sent_at = -float("inf")  # at most one value a second: the next batch sends one
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        [(_, answer)] = predict(service, GOOD)
        predict(service, {"history": closes(seed=8).tolist()})  # within the second: no second value
    lines = [r.getMessage().removeprefix("[METRICS]") for r in caplog.records]
    for k, level in enumerate(("80", "95")):
        iv = answer["intervals"][k]
        width = 100 * (iv["upper"][0] - iv["lower"][0]) / GOOD["history"][-1]
        prefix = f"IntervalWidth.Percent:{round(width, 4)}|#ModelName:lstm,Level:Model,ModelVersion:{version},Interval:{level}|"
        assert sum(m.startswith(prefix) for m in lines) == 1, (prefix, lines)


def test_a_tampered_scaler_is_refused_at_load(model_dir, tmp_path, caplog):
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    scaler = json.loads((tampered / "scaler.json").read_text())
    scaler["scale"][0] *= 2
    (tampered / "scaler.json").write_text(json.dumps(scaler))
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="scaler.json does not match"):
        load_service(tampered)
    assert any("refusing to load: scaler.json sha256" in r.getMessage() for r in caplog.records)


def test_the_archive_holds_no_pickle(mar):
    import onnx

    with zipfile.ZipFile(mar) as z:
        names = sorted(z.namelist())
        assert names == ["MAR-INF/MANIFEST.json", "forecast_handler.py", "meta.json",
                         "model-config.yaml", "model.onnx", "scaler.json", "stockcast_features.py"]
        # the transform the handler uses is training's, byte for byte
        assert z.read("stockcast_features.py") == (ROOT / "src" / "stockcast" / "features.py").read_bytes()
        onnx.checker.check_model(onnx.load_from_string(z.read("model.onnx")))  # protobuf
        for name in ("meta.json", "scaler.json", "MAR-INF/MANIFEST.json"):
            json.loads(z.read(name))
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"] == "model.onnx"


def test_the_torchscript_archive_gives_the_same_forecast(artifacts, service, tmp_path):
    from stockcast.package import build_archive

    mar = build_archive(artifacts, tmp_path, handlers=ROOT / "handlers", model_format="torchscript")
    zipfile.ZipFile(mar).extractall(tmp_path / "unpacked")
    torchscript = load_service(tmp_path / "unpacked")
    assert torchscript._entry_point.__self__.session is None
    [(_, a)], [(_, b)] = predict(torchscript, GOOD), predict(service, GOOD)
    np.testing.assert_allclose(a["forecast"], b["forecast"], rtol=1e-5)


RANGE = "data.features=[log_return,log_range,has_range]"


@pytest.fixture(scope="module")
def range_model(tmp_path_factory):
    """A quickly trained model that reads each day's high-low range, archived and loaded."""
    from conftest import QUICK, compose_train

    from stockcast.package import build_archive
    from stockcast.training import train

    tmp = tmp_path_factory.mktemp("range")
    # a larger learning rate: two short epochs must move the network off its EWMA start
    train(compose_train(tmp, "experiment=petr4", RANGE, "model.lr=0.01", *QUICK))
    artifacts = tmp / "artifacts" / "petr4"
    mar = build_archive(artifacts, tmp / "store", handlers=ROOT / "handlers")
    zipfile.ZipFile(mar).extractall(tmp / "unpacked")
    return artifacts, load_service(tmp / "unpacked")


def ranged(seed: int = 0, k: float = 1.0) -> dict:
    history = closes(seed=seed)
    spread = np.random.default_rng(seed + 100).uniform(0.005, 0.04, len(history))
    return {"history": (k * history).tolist(), "high": (k * history * (1 + spread)).tolist(),
            "low": (k * history * (1 - spread / 2)).tolist()}


def test_a_range_model_reads_high_and_low_and_answers_closes_alone(range_model):
    artifacts, service = range_model
    meta = json.loads((artifacts / "meta.json").read_text())
    assert meta["features"] == ["log_return", "log_range", "has_range"]
    body = ranged()
    [(status, with_range)], [(status_alone, alone)] = predict(service, body), predict(
        service, {"history": body["history"]})
    assert status == status_alone == 200 and "intervals" in with_range and "intervals" in alone
    assert with_range["intervals"] != alone["intervals"]  # the ranges change the answer
    # both are the exported network's answer to the scaled features, ranges known or not
    scaler = json.loads((artifacts / "scaler.json").read_text())
    model = torch.jit.load(str(artifacts / "model.pt"))
    h, hi, lo = (np.array([body[k]]) for k in ("history", "high", "low"))
    mean, scale = np.array(scaler["mean"]), np.array(scaler["scale"])
    for answer, (high, low) in ((with_range, (hi, lo)), (alone, (None, None))):
        # the inputs built by hand, not with the transform under test: each day's log return and
        # log range, standardised, the range 0 and has_range 0 where unknown
        returns = np.diff(np.log(h[0]))
        known = np.ones_like(returns) if high is not None else np.zeros_like(returns)
        ranges = np.log(high[0, 1:] / low[0, 1:]) if high is not None else np.zeros_like(returns)
        x = np.stack([(returns - mean[0]) / scale[0], known * (ranges - mean[1]) / scale[1], known],
                     axis=-1)[None].astype(np.float32)
        np.testing.assert_allclose(x, to_inputs(h, mean, scale, high, low), atol=1e-6)
        with torch.no_grad():
            q = model(torch.from_numpy(x)).double().numpy()
        prices = h[0, -1] * np.exp(q[0, 0] * scaler["scale"][0] + scaler["mean"][0])
        np.testing.assert_allclose([answer["intervals"][1]["lower"][0], answer["intervals"][1]["upper"][0]],
                                   prices[[0, 4]], rtol=1e-5)
    # one batch mixing requests with and without ranges answers each as it would alone
    mixed = predict(service, body, {"history": body["history"]})
    for (_, got), expected in zip(mixed, (with_range, alone), strict=True):  # float32: batch-size noise
        for a, b in zip(got["intervals"], expected["intervals"], strict=True):
            np.testing.assert_allclose([a["lower"], a["upper"]], [b["lower"], b["upper"]], rtol=1e-6)


@pytest.mark.parametrize("k", [0.01, 3, 100])
def test_a_range_models_answer_scales_with_all_prices(range_model, k):
    _, service = range_model
    [(_, base)], [(_, scaled)] = predict(service, ranged()), predict(service, ranged(k=k))
    np.testing.assert_allclose(scaled["forecast"], np.multiply(k, base["forecast"]), rtol=1e-5)
    for a, b in zip(base["intervals"], scaled["intervals"], strict=True):
        np.testing.assert_allclose(b["upper"], np.multiply(k, a["upper"]), rtol=1e-5)


@pytest.mark.parametrize("change, reason, words", [
    ({"low": None}, "range_incomplete", '"high" needs "low" too'),
    ({"high": [1.0] * 5}, "range_misaligned", '"high" must be a list as long as "history" (60)'),
    ({"low": "x"}, "range_misaligned", '"low" must be a list'),
    ({"high": [None] * 60}, "not_number", "high[0] is not a number but null"),
    ({"swap": True}, "implausible_range", "day 0: high"),
    ({"high": [1e300] * 60}, "implausible_range", "are not a range"),
    ({"high": [float("nan")] * 60}, "implausible_range", "day 0: high nan"),
    ({"high": [10**400] * 60}, "implausible_range", "day 0: high inf"),  # JSON integers have no limit
    ({"low": [1e-9] * 60}, "implausible_range", "prices 1e-06 .. 1e+09"),
])
def test_bad_ranges_are_a_400_naming_the_problem(range_model, change, reason, words):
    _, service = range_model
    body = ranged()
    for key, value in change.items():
        if key == "swap":
            body["high"], body["low"] = body["low"], body["high"]
        elif value is None:
            body.pop(key)
        else:
            body[key] = value
    [(status, answer)] = predict(service, body)
    assert status == 400 and answer["reason"] == reason and words in answer["error"], answer


def test_only_the_last_window_days_of_high_and_low_are_read(range_model):
    _, service = range_model
    long = {k: v + v[:20] for k, v in ranged(seed=3).items()}  # 80 days
    last = {k: v[-60:] for k, v in long.items()}
    [(status, a)], [(_, b)] = predict(service, long), predict(service, last)
    assert status == 200 and a["intervals"] == b["intervals"]


def test_a_closes_only_model_ignores_high_and_low(service):
    [(_, plain)], [(status, with_range)] = predict(service, GOOD), predict(
        service, {**GOOD, "high": "anything", "low": [1]})
    assert status == 200 and with_range["intervals"] == plain["intervals"]


# ---- many forecasts per call: {"instances": [...]} on the plain endpoint ----------------------

def as_object(body):
    """A BAD body as the JSON value an instance would hold (None for those that are not JSON)."""
    if isinstance(body, (dict, list)):
        return body
    try:
        return json.loads(body) if isinstance(body, str) and len(body) < 10000 else None
    except ValueError:
        return None


def test_each_instance_is_answered_as_if_sent_alone(service):
    """Good and bad instances of every kind: each prediction is the forecast or the error object
    the same history gets in a request of its own, in order."""
    instances = [GOOD] + [obj for body, _ in BAD.values() if (obj := as_object(body)) is not None]
    instances += [{"history": closes(seed=s).tolist()} for s in range(3)] + [history_with(True), 7]
    [(status, answer)] = predict(service, {"instances": instances})
    assert status == 200 and list(answer) == ["predictions"]
    assert len(answer["predictions"]) == len(instances) > 30
    for instance, prediction in zip(instances, answer["predictions"], strict=True):
        [(_, alone)] = predict(service, json.dumps(instance))  # the same JSON value, sent alone
        assert_same(prediction, alone)


def assert_same(a, b):
    """Equal JSON values, numbers within float32 rounding (a batch's forward differs in ~1e-11)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a, b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6), (a, b)
    else:
        assert a == b


def test_equal_length_histories_are_checked_as_one_array_with_the_same_verdicts(service, monkeypatch):
    """The vectorised checks (plain histories of one length) refuse exactly what the one-by-one
    checks refuse, with the same messages, and leave the good ones to the array path."""
    defects = [history_with(0), history_with(-3.5), history_with(300.0, at=30), history_with(2e9, at=7),
               history_with(5e-324), {"history": [30.1] * 59 + [float("inf")]},
               {"history": [30.1] * 30 + [float("nan")] + [30.2] * 29}]
    instances = [{"history": closes(seed=s).tolist()} for s in range(50)] + defects
    alone = [predict(service, x)[0][1] for x in instances]
    handler, checked = service._entry_point.__self__, []
    real_days = handler.days
    monkeypatch.setattr(handler, "days", lambda body: checked.append(body) or real_days(body))
    [(status, answer)] = predict(service, {"instances": instances})
    assert status == 200
    assert_same(answer["predictions"], alone)
    assert len(checked) == len(defects)  # only the refused ones were checked one by one


def test_a_thousand_histories_take_one_forward_pass(service, artifacts, monkeypatch):
    handler = service._entry_point.__self__
    real_forecast, batches = handler.forecast, []
    monkeypatch.setattr(handler, "forecast", lambda days: batches.append(len(days)) or real_forecast(days))
    histories = closes(batch=1000, seed=3)
    [(status, answer), (status_alone, _)] = predict(
        service, {"instances": [{"history": h.tolist()} for h in histories]}, GOOD)
    assert status == status_alone == 200
    assert batches == [1001]  # the other request of the batch with them
    expected = forecast_from_export(artifacts, histories)
    np.testing.assert_allclose([p["forecast"] for p in answer["predictions"]], expected, rtol=1e-5)


@pytest.mark.parametrize(("instances", "reason"), [
    ([], "no_instances"), (None, "no_instances"), ({"history": GOOD["history"]}, "no_instances"),
    ("abc", "no_instances"), ([GOOD] * 1001, "too_many_instances")])
def test_a_request_whose_instances_cannot_be_read_is_a_400(service, instances, reason):
    [(status, answer)] = predict(service, {"instances": instances})
    assert (status, answer["reason"]) == (400, reason)
    assert "instances" in answer["error"]


def test_an_instance_list_once_read_is_a_200_with_each_items_code(service):
    # even when none is answered: a 4xx goes out with Connection: close, which cut long answers short
    [(status, answer)] = predict(service, {"instances": [{"history": [1]}, history_with("x")]})
    assert status == 200
    assert [(p["code"], p["reason"]) for p in answer["predictions"]] == [(400, "too_short"),
                                                                         (400, "not_number")]
    # a list that cannot be read is the request's own error
    [(status, answer)] = predict(service, {"instances": [GOOD] * 1001})
    assert status == 400 and answer["reason"] == "too_many_instances"
    # one client's bad instances change nothing for the others in its batch
    answers = predict(service, {"instances": [{"history": [1]}]}, GOOD, {"instances": [GOOD, {}]})
    assert [s for s, _ in answers] == [200, 200, 200]
    assert_same(answers[2][1]["predictions"][0], answers[1][1])
    assert answers[2][1]["predictions"][1]["reason"] == "missing_history"


CORRUPTIONS = [True, None, "30.5", float("nan"), float("inf"), -1.0, 0, 5e-324, 2e9, 10**400, [1.0], 300.0]


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 1000), st.sampled_from([None, *range(len(CORRUPTIONS))]),
                          st.integers(0, 59), st.sampled_from([60, 60, 60, 61])), min_size=1, max_size=12))
def test_generated_instance_lists_get_the_answers_each_history_gets_alone(service, spec):
    """Whatever mix of lengths and bad values: the array checks and the one-by-one checks agree."""
    instances = []
    for seed, corruption, at, n in spec:
        history = closes(n, seed=seed).tolist()
        if corruption is not None:
            history[at] = CORRUPTIONS[corruption]
        instances.append({"history": history})
    [(status, answer)] = predict(service, json.dumps({"instances": instances}))
    alone = [predict(service, json.dumps(x))[0] for x in instances]
    assert status == 200
    assert_same(answer["predictions"], [a for _, a in alone])
