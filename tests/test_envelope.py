"""KServe's protocols through TorchServe's own envelopes (service_envelope=kserve | kservev2, what
KServe's TorchServe runtime sets with TS_SERVICE_ENVELOPE): a real server each, real requests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import ORIGINAL, post, url

from stockcast.serve import free_ports, start, stop

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
HISTORY = ORIGINAL["history"]


def serving(envelope: str, mar: Path, home: Path):
    return start(mar.parent, home, handlers=ROOT / "handlers", ports=free_ports(),
                 settings={"service_envelope": envelope})


@pytest.fixture(scope="module")
def v1(mar, tmp_path_factory):
    srv = serving("kserve", mar, tmp_path_factory.mktemp("v1"))
    try:
        yield srv
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def v2(mar, tmp_path_factory):
    srv = serving("kservev2", mar, tmp_path_factory.mktemp("v2"))
    try:
        yield srv
    finally:
        stop(srv)


def test_v1_answers_each_instance_as_the_plain_endpoint_does(v1, server):
    scaled = [2 * x for x in HISTORY]
    status, body = post(v1, json.dumps({"instances": [{"history": HISTORY}, {"history": scaled}]}))
    assert status == 200 and list(body) == ["predictions"] and len(body["predictions"]) == 2
    plain = post(server, json.dumps(ORIGINAL))[1]  # the plain endpoint of a server without envelope
    first, second = body["predictions"]
    assert first["forecast"] == pytest.approx(plain["forecast"], rel=1e-6)
    for ours, theirs in zip(first["intervals"], plain["intervals"], strict=True):
        assert ours["level"] == theirs["level"]
        assert np.allclose(ours["lower"], theirs["lower"], rtol=1e-6)
        assert np.allclose(ours["upper"], theirs["upper"], rtol=1e-6)
    assert second["forecast"] == pytest.approx([2 * f for f in first["forecast"]], rel=1e-5)


def test_v1_a_bad_instance_gets_its_error_and_the_others_their_forecasts(v1):
    status, body = post(v1, json.dumps({"instances": [{"history": [1, 2]}, {"history": HISTORY}]}))
    bad, good = body["predictions"]
    assert status == 200 and bad["code"] == 400 and bad["reason"] == "too_short" and good["forecast"]


def test_v1_instances_none_answerable_are_a_200_with_each_error(v1):
    # a 4xx answer comes with Connection: close, which cut long ones short: the list is the answer
    status, body = post(v1, json.dumps({"instances": [{"history": [1, 2]}, {"history": "x"}]}))
    assert status == 200 and [p["reason"] for p in body["predictions"]] == ["too_short", "not_list"], body


def test_v1_instances_shaped_like_torchserve_rows_are_read_as_instances(v1):
    # {"data": ...} and {"body": ...} are TorchServe's own row keys: under the envelope they are
    # decoded instances, answered inside the envelope (they once made the handler return bytes: 503)
    instances = [{"data": {"history": HISTORY}}, {"body": "x"}, {"history": HISTORY}]
    status, body = post(v1, json.dumps({"instances": instances}))
    first, second, third = body["predictions"]
    assert status == 200 and first["forecast"] == third["forecast"], body
    assert second["reason"] == "invalid_json"


@pytest.mark.parametrize(("body", "reason"), [
    ({"instances": []}, "no_instances"),
    ({"history": HISTORY}, "no_instances"),  # a plain body sent to an enveloped server
])
def test_v1_a_request_with_no_answerable_instance_is_a_400_naming_it(v1, body, reason):
    status, answer = post(v1, json.dumps(body))
    assert status == 400 and answer["predictions"][0]["reason"] == reason, answer


def test_v2_answers_a_history_tensor(v2, server):
    tensor = {"name": "history", "shape": [len(HISTORY)], "datatype": "FP64", "data": HISTORY}
    status, body = post(v2, json.dumps({"id": "r1", "inputs": [tensor]}))
    assert status == 200 and body["id"] == "r1" and body["model_name"] == "lstm", body
    (output,) = body["outputs"]
    plain = post(server, json.dumps(ORIGINAL))[1]
    assert output["name"] == "history" and output["data"][0]["forecast"] == pytest.approx(plain["forecast"])


def test_v2_a_tensor_of_several_histories_is_a_400_naming_the_shape(v2):
    tensor = {"name": "history", "shape": [2, len(HISTORY)], "datatype": "FP64", "data": HISTORY * 2}
    status, body = post(v2, json.dumps({"inputs": [tensor]}))
    assert status == 400 and body["outputs"][0]["data"][0]["reason"] == "bad_shape", body


def test_the_plain_endpoint_is_unchanged_without_an_envelope(server):
    status, body = post(url(server), json.dumps(ORIGINAL), headers=server.headers())
    assert status == 200 and "forecast" in body and "predictions" not in body
