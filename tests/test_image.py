"""The serving image, built and run: token, forecast, metrics, healthcheck, uid 10001, a quick stop.

    make image-test      # builds the image first only when its inputs changed (deploy/image/build.sh)

Needs podman (deploy/image/base.sh installs it and makes the base image here; .ci/run runs both).
The tests share one container and run in file order: the last one stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
from conftest import ROOT
from helpers import ORIGINAL

from stockcast.serve import free_ports

pytestmark = pytest.mark.slow
IMAGE = os.environ.get("IMAGE", "stockcast:latest")
HOME = "/home/model-server"


@dataclass
class Container:
    name: str
    ports: tuple[int, int, int]  # host ports of inference, management, metrics

    def url(self, port: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def keys(self) -> dict:
        """TorchServe's key_file.json inside the container (drawn at each start)."""
        return json.loads(podman("exec", self.name, "cat", f"{HOME}/key_file.json").stdout)

    def auth(self, api: str) -> dict:
        return {"Authorization": f"Bearer {self.keys()[api]['key']}"}


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        pytest.fail(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done


def request(url: str, headers: dict | None = None, body: bytes | None = None,
            method: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def worker_states(box: Container) -> list[str]:
    code, body = request(box.url(1, "/models/lstm"), box.auth("management"))
    assert code == 200, body
    return [w["status"] for w in json.loads(body)[0]["workers"]]


def wait_for(box: Container, done, timeout: float = 60) -> list[str]:
    """The worker states once `done(states)`, or when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not done(states := worker_states(box)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return states


def healthcheck(box: Container) -> subprocess.CompletedProcess:
    """podman runs the image's HEALTHCHECK command itself (no systemd timer here)."""
    return podman("healthcheck", "run", box.name, check=False)


@pytest.fixture(scope="module")
def image() -> str:
    """The image, rebuilt when what it is built from changed (a cold build takes ~5-6 min on 2 cores)."""
    if not shutil.which("podman"):
        if os.environ.get("CI") == "true":
            pytest.fail("podman missing in CI: .ci/run installs it with deploy/image/base.sh")
        pytest.skip("podman not installed: deploy/image/base.sh installs it (as root)")
    build = subprocess.run([ROOT / "deploy" / "image" / "build.sh", "--if-stale"], cwd=ROOT,
                           env={**os.environ, "IMAGE": IMAGE}, capture_output=True, text=True,
                           timeout=40 * 60)
    if build.returncode:
        pytest.fail(f"deploy/image/build.sh failed (exit {build.returncode}):\n"
                    f"{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    return IMAGE


@pytest.fixture(scope="module")
def box(image):
    """A container of `image` on free loopback ports, once a worker is READY; removed afterwards."""
    ports = free_ports(3)
    name = f"stockcast-test-{uuid.uuid4().hex[:8]}"
    publish = [f"-p127.0.0.1:{host}:{inside}" for host, inside in zip(ports, (8080, 8081, 8082), strict=True)]
    podman("run", "--detach", "--name", name, *publish, image)
    try:
        started, box = time.monotonic(), Container(name, ports)
        while True:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running":
                logs = podman("logs", name, check=False)
                pytest.fail(f"container {state}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
            if podman("exec", name, "test", "-e", f"{HOME}/key_file.json", check=False).returncode == 0:
                try:
                    if "READY" in worker_states(box):
                        break
                except (AssertionError, OSError):  # key file written before the API listens
                    pass
            if time.monotonic() - started > 180:
                pytest.fail(f"no READY worker after 180 s:\n{podman('logs', name).stderr[-3000:]}")
            time.sleep(1)
        print(f"{name}: a worker READY {time.monotonic() - started:.1f} s after the start")
        yield box
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_ping_needs_the_inference_key(box):
    assert request(box.url(0, "/ping"), box.auth("inference")) == (200, '{\n  "status": "Healthy"\n}\n')
    assert request(box.url(0, "/ping"))[0] == 400
    assert request(box.url(0, "/ping"), {"Authorization": "Bearer wrong"})[0] == 400


def test_forecast(box):
    path, body = "/predictions/lstm", json.dumps(ORIGINAL).encode()
    json_type = {"Content-Type": "application/json"}
    code, text = request(box.url(0, path), {**json_type, **box.auth("inference")}, body)
    assert code == 200, text
    forecast = json.loads(text)["forecast"]
    assert forecast and all(0.5 * ORIGINAL["history"][-1] < p < 2 * ORIGINAL["history"][-1]
                            for p in forecast)
    assert request(box.url(0, path), json_type, body)[0] == 400  # no key


def test_metrics_without_a_key(box):
    request(box.url(0, "/predictions/lstm"), {"Content-Type": "application/json", **box.auth("inference")},
            json.dumps(ORIGINAL).encode())
    code, text = request(box.url(2, "/metrics"))
    assert code == 200
    assert "# TYPE ts_inference_requests_total counter" in text
    assert any(line.startswith("ts_inference_requests_total{") for line in text.splitlines())


def test_everything_runs_as_uid_10001(box):
    # uid, command line of every process but the exec's own: tini, torchserve, java, the workers
    script = ("import os, pathlib\n"
              "for p in pathlib.Path('/proc').glob('[0-9]*'):\n"
              "    if int(p.name) != os.getpid():\n"
              "        status = (p / 'status').read_text().splitlines()\n"
              "        uid = [line.split()[1] for line in status if line.startswith('Uid:')][0]\n"
              "        print(uid, (p / 'cmdline').read_bytes().replace(b'\\0', b' ').decode()[:160])\n")
    processes = podman("exec", box.name, "python", "-c", script).stdout.splitlines()
    assert {line.split()[0] for line in processes} == {"10001"}, processes
    commands = " ".join(processes)
    assert "tini" in commands and "java" in commands and "model_service_worker" in commands
    assert podman("exec", box.name, "id", "-u").stdout.strip() == "10001"


def test_healthcheck_passes_only_while_a_worker_is_ready(box):
    assert json.loads(podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}",
                             IMAGE).stdout)["Test"][1:] == [
        "python", f"{HOME}/healthcheck.py", "--timeout", "4"]
    assert healthcheck(box).returncode == 0
    # what a Kubernetes exec probe runs, timed inside the container: within a probe's 1 s default
    timed = ("import subprocess, time; start = time.monotonic(); "
             f"subprocess.run(['python', '{HOME}/healthcheck.py'], check=True); "
             "print(time.monotonic() - start)")
    seconds = float(podman("exec", box.name, "python", "-c", timed).stdout)
    print(f"healthcheck.py answered in {seconds:.3f} s")
    assert seconds < 1
    # asynchronous: in the container a synchronous scale to 0 answered 500 ("Failed to start
    # workers", a worker's exit interrupted) although it scaled down
    scale = box.url(1, "/models/lstm?min_worker=")
    try:
        assert request(scale + "0&max_worker=0", box.auth("management"), method="PUT")[0] == 202
        assert wait_for(box, lambda states: states == []) == []
        assert healthcheck(box).returncode != 0
    finally:
        request(scale + "2&max_worker=2", box.auth("management"), method="PUT")
    assert "READY" in wait_for(box, lambda states: "READY" in states)
    assert healthcheck(box).returncode == 0


def test_stops_in_under_5_s(box):
    """Last: SIGTERM (podman stop) reaches TorchServe through tini, not the 10 s kill."""
    assert healthcheck(box).returncode == 0  # a server with READY workers
    started = time.monotonic()
    podman("stop", "--time", "10", box.name, timeout=30)
    elapsed = time.monotonic() - started
    code = podman("inspect", "--format", "{{.State.ExitCode}}", box.name).stdout.strip()
    print(f"{box.name}: stopped in {elapsed:.2f} s, exit {code}")
    assert elapsed < 5 and code != "137", (elapsed, code)  # 137: SIGKILL after the grace period


# ---- KServe's TorchServe runtime, emulated with this image -----------------------------------------

@pytest.fixture(scope="module")
def kserve_models(mar, tmp_path_factory):
    """What KServe's storage initializer leaves at /mnt/models: `make package --kserve DIR`'s folder."""
    from stockcast.package import kserve_folder

    folder = kserve_folder(mar, tmp_path_factory.mktemp("kserve"), handlers=ROOT / "handlers")
    for path in (folder, *folder.rglob("*")):  # pytest's folders are 0700: the server is uid 10001
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


V1 = {"instances": [{"history": ORIGINAL["history"]}, {"history": [1, 2]}]}
V2 = {"id": "r1", "inputs": [{"name": "history", "shape": [60], "datatype": "FP64",
                              "data": ORIGINAL["history"][-60:]}]}


@pytest.mark.parametrize(("envelope", "body"), [("kserve", V1), ("kservev2", V2)])
def test_the_kserve_runtime_emulated_answers_its_protocol(image, kserve_models, envelope, body):
    """The runtime's container minus KServe's wrapper: the folder mounted read-only at /mnt/models,
    TorchServe started on its config.properties with TS_SERVICE_ENVELOPE as the runtime sets it, and
    the request the wrapper forwards sent from inside the pod to TorchServe's 127.0.0.1:8085."""
    name = f"stockcast-kserve-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "-v", f"{kserve_models}:/mnt/models:ro",
           "-e", f"TS_SERVICE_ENVELOPE={envelope}", image, "torchserve", "--foreground",
           "--ts-config", "/mnt/models/config/config.properties",
           "--model-store", "/mnt/models/model-store")
    ask = ("import json, sys, urllib.request as u, urllib.error as e\n"
           "r = u.Request(sys.argv[1], data=sys.argv[2].encode() or None,"
           " headers={'Content-Type': 'application/json'})\n"
           "try:\n    a = u.urlopen(r, timeout=10); print(a.status, a.read().decode())\n"
           "except e.HTTPError as err:\n    print(err.code, err.read().decode())\n"
           "except OSError:\n    print(0)\n")

    def inside(url: str, data: str = "") -> tuple[int, str]:
        code, _, text = podman("exec", name, "python", "-c", ask, url, data).stdout.partition(" ")
        return int(code), text

    try:
        deadline = time.monotonic() + 180
        while inside("http://127.0.0.1:8085/models/lstm")[1].count('"READY"') == 0:  # no key: token off
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-3000:]
            time.sleep(1)
        code, text = inside("http://127.0.0.1:8085/predictions/lstm", json.dumps(body))
        answer = json.loads(text)
        if envelope == "kserve":
            good, bad = answer["predictions"]
            assert code == 200 and good["forecast"] and bad["reason"] == "too_short", answer
        else:
            (output,) = answer["outputs"]
            assert code == 200 and answer["id"] == "r1" and output["data"][0]["forecast"], answer
        metrics = podman("exec", name, "python", "-c", "import urllib.request as u; print(u.urlopen("
                         "'http://127.0.0.1:8082/metrics', timeout=5).read().decode())").stdout
        assert 'ForecastsServed{ModelName="lstm"' in metrics
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
