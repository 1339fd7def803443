"""package --kserve DIR: the folder KServe's TorchServe runtime serves from a storageUri, read the
way its wrapper (pytorch/serve kubernetes/kserve/kserve_wrapper/__main__.py) reads it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from stockcast.package import KSERVE_ROOT, PROFILES, kserve_folder, model_config


def wrapper_config(folder: Path) -> dict:
    """parse_config() of KServe's wrapper: `name=value` lines, model_snapshot as JSON."""
    config = {}
    for line in (folder / "config" / "config.properties").read_text().splitlines():
        if not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            config[name.strip()] = value.strip()
    config["model_snapshot"] = json.loads(config["model_snapshot"])
    return config


def local(path: str, folder: Path) -> Path:
    """A path of the pod (under /mnt/models) in `folder`."""
    assert path.startswith(KSERVE_ROOT + "/"), path
    return folder / path.removeprefix(KSERVE_ROOT + "/")


@pytest.fixture(scope="module")
def folder(mar, tmp_path_factory) -> Path:
    return kserve_folder(mar, tmp_path_factory.mktemp("kserve") / "petr4", handlers=ROOT / "handlers")


def test_the_wrapper_finds_lstm_on_torchserves_port(folder, mar) -> None:
    config = wrapper_config(folder)
    # the wrapper serves 8080 (HTTP) and 8081 (gRPC) itself and forwards to inference_address
    assert config["inference_address"] == config["management_address"] == "http://127.0.0.1:8085"
    assert config["metrics_address"].endswith(":8082")  # the runtime's prometheus.kserve.io/port
    assert config["disable_token_authorization"] == "true"  # the wrapper sends no key
    assert config["enable_envvars_config"] == "true"  # TS_SERVICE_ENVELOPE -> service_envelope
    assert "service_envelope" not in config  # the runtime sets it per protocol
    snapshot = config["model_snapshot"]
    assert list(snapshot["models"]) == ["lstm"] and snapshot["modelCount"] == 1
    with zipfile.ZipFile(mar) as z:
        version = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]
    (entry,) = snapshot["models"]["lstm"].values()
    assert list(snapshot["models"]["lstm"]) == [version] and entry["defaultVersion"] is True
    store = local(config["model_store"], folder)
    assert (store / entry["marName"]).read_bytes() == mar.read_bytes()
    assert sorted(p.name for p in store.iterdir()) == ["lstm.mar"]
    metrics = local(config["metrics_config"], folder)
    assert metrics.read_bytes() == (ROOT / "handlers" / "metrics.yaml").read_bytes()
    log4j = re.search(r"-Dlog4j\.configurationFile=file://(\S+)", config["vmargs"])[1]
    assert local(log4j, folder).read_bytes() == (ROOT / "handlers" / "log4j2.xml").read_bytes()
    allowed = config["allowed_urls"].replace("\\\\", "\\")  # Java properties unescaping
    assert re.fullmatch(allowed, f"file://{KSERVE_ROOT}/model-store/lstm.mar")
    assert not re.fullmatch(allowed, "https://example.com/lstm.mar")


@pytest.mark.parametrize("profile", list(PROFILES))
def test_workers_are_the_archives_and_a_batch_is_one_request(profile, mar, tmp_path) -> None:
    kserve_folder(mar, tmp_path, handlers=ROOT / "handlers", overrides=PROFILES[profile])
    (entry,) = wrapper_config(tmp_path)["model_snapshot"]["models"]["lstm"].values()
    archived = yaml.safe_load(model_config(ROOT / "handlers", PROFILES[profile]))
    keys = ("minWorkers", "maxWorkers", "responseTimeout")
    assert {k: entry[k] for k in keys} == {k: archived[k] for k in keys}
    assert entry["batchSize"] == 1  # the v1 envelope answers a batch's first request only


def test_serving_limits_are_the_docker_configs(folder) -> None:
    config = wrapper_config(folder)
    docker = dict(line.split("=", 1) for line in (ROOT / "handlers" / "config.docker.properties")
                  .read_text().splitlines() if "=" in line and not line.startswith("#"))
    for key in ("max_request_size", "max_response_size", "default_response_timeout", "enable_model_api"):
        assert config[key] == docker[key], key
    assert config["vmargs"].startswith(docker["vmargs"])


def test_concurrent_writes_leave_whole_files(mar, tmp_path) -> None:
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(10):
                kserve_folder(mar, tmp_path, handlers=ROOT / "handlers")
        except BaseException as err:  # noqa: B036  reported below
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in (tmp_path / "config").iterdir()) == [
        "config.properties", "log4j2.xml", "metrics.yaml"]  # no temporary file left behind
    assert [p.name for p in (tmp_path / "model-store").iterdir()] == ["lstm.mar"]
    assert (tmp_path / "model-store" / "lstm.mar").read_bytes() == mar.read_bytes()
    assert wrapper_config(tmp_path)["model_snapshot"]["models"]["lstm"]


def test_the_command_line_writes_the_folder(artifacts, tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "stockcast.package", str(artifacts), str(tmp_path / "store"),
                           "--kserve", str(tmp_path / "kserve")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kserve" / "model-store" / "lstm.mar").read_bytes() == \
        (tmp_path / "store" / "lstm.mar").read_bytes()
    assert "for KServe" in done.stdout


@pytest.mark.slow
def test_torchserve_serves_the_kserve_folder_with_the_v1_envelope(folder, tmp_path) -> None:
    """What the runtime's container runs, minus KServe's wrapper: TorchServe 0.12 with the folder's
    config and TS_SERVICE_ENVELOPE=kserve, paths and ports moved to this machine. Workers READY
    without a key, a v1 body answered in a v1 envelope, metrics scraped."""
    from stockcast.serve import free_ports, java_home

    http, metrics, grpc_i, grpc_m = free_ports(4)
    text = (folder / "config" / "config.properties").read_text().replace(KSERVE_ROOT, str(folder))
    text = (text.replace("127.0.0.1:8085", f"127.0.0.1:{http}")
            .replace("0.0.0.0:8082", f"127.0.0.1:{metrics}")
            .replace("grpc_inference_port=7070", f"grpc_inference_port={grpc_i}")
            .replace("grpc_management_port=7071", f"grpc_management_port={grpc_m}"))
    config = tmp_path / "config.properties"
    config.write_text(text)
    env = {**os.environ, "TS_SERVICE_ENVELOPE": "kserve", "TMPDIR": str(tmp_path), "TEMP": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    if java := java_home():
        env["JAVA_HOME"], env["PATH"] = java, os.pathsep.join([f"{java}/bin", env["PATH"]])
    launcher = Path(sys.executable).with_name("torchserve")
    with open(tmp_path / "console.log", "wb") as console:
        proc = subprocess.Popen([str(launcher), "--foreground", f"--model-store={folder}/model-store",
                                 f"--ts-config={config}"], cwd=tmp_path, env=env, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/models/lstm", timeout=2) as r:  # no key
                    if any(w["status"] == "READY" for w in json.load(r)[0]["workers"]):
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "console.log").read_text()[-3000:]
            time.sleep(0.5)
        closes = json.loads((ROOT / "examples" / "petr4_request.json").read_text())["history"]
        body = json.dumps({"instances": [{"history": closes}]}).encode()  # KServe v1
        request = urllib.request.Request(f"{base}/predictions/lstm", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            (prediction,) = json.load(r)["predictions"]
        assert prediction["model"]["name"] == "lstm" and prediction["prediction"] > 0

        def ask(_) -> int:  # concurrent requests: with batches of several, all of them got 503
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(ask, range(200)))
        assert statuses == [200] * 200, sorted(set(statuses))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            assert b"ts_inference_requests_total" in r.read()
        assert not (tmp_path / "key_file.json").exists()  # token auth off
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
