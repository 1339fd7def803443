"""Monitoring: the alert rules pass their promtool unit tests (and fail them when broken), and a real
Prometheus scraping a real TorchServe, after good and bad traffic, a killed worker and a spell with
no worker, has data for every panel of the Grafana dashboard and loads every rule."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import ORIGINAL, api, binary, dashboard_exprs, post, pushed, query, running_prometheus, wait_for

from stockcast.serve import free_ports, start, stop

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
RULES = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
ALERTS = [rule["alert"] for group in RULES for rule in group["rules"]]


def promtool_test(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), "test", "rules", "alerts_test.yml"], cwd=folder,
                          capture_output=True, text=True, timeout=60)


def test_the_alert_rules_pass_their_unit_tests() -> None:
    check = subprocess.run([binary("promtool"), "check", "rules", str(MONITORING / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = promtool_test(MONITORING)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_every_alert_has_a_case_where_it_fires() -> None:
    cases = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    firing = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for case in cases for t in case["alert_rule_test"] if not t["exp_alerts"]}
    assert firing == set(ALERTS) and quiet == set(ALERTS)
    assert set(ALERTS) >= {"StockcastTargetDown", "StockcastErrorRatioHigh", "StockcastHandlerP99OverSLO",
                           "StockcastNoHealthyWorker", "StockcastModelStale", "StockcastWorkerRestarted"}


@pytest.mark.parametrize("alert", ALERTS)
def test_a_broken_rule_fails_its_unit_tests(alert: str, tmp_path: Path) -> None:
    """A rule that never fires, or always does, fails promtool's tests: they test the rule."""
    for broken in ("vector(1) == 0", "vector(1)"):
        groups = json.loads(json.dumps(RULES))
        for rule in groups[0]["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = broken
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
        shutil.copy(MONITORING / "alerts_test.yml", tmp_path)
        run = promtool_test(tmp_path)
        assert run.returncode != 0 and f"alertname: {alert}," in run.stdout + run.stderr, (broken, run.stdout)


# ---- a real Prometheus against a real TorchServe -------------------------------------------------

@pytest.fixture(scope="module")
def watched(mar, tmp_path_factory):
    """A TorchServe of its own (a worker gets killed) with system metrics every 2 s, and a
    Prometheus scraping it every second with the shipped rules; both stopped by pid."""
    home = tmp_path_factory.mktemp("watched")
    srv = start(mar.parent, home / "ts", handlers=ROOT / "handlers", ports=free_ports(),
                settings={"metric_time_interval": "2"})
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")  # shipped: 15 s
    # TorchServe only: the Pushgateway's figures are tested in test_quality.py
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "torchserve"]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{srv.ports[2]}"]
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    try:
        with running_prometheus(home / "prometheus", config) as prometheus:
            yield srv, prometheus
    finally:
        stop(srv)


def manage(srv, path: str, method: str = "PUT") -> int:
    request = urllib.request.Request(f"{srv.management}{path}", method=method,
                                     headers=srv.headers("management"))
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status


def workers(srv) -> list[int]:
    """Pids of the server's live Python workers."""
    found = []
    for proc in psutil.Process(srv.pid).children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "model_service_worker" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return found


@pytest.mark.slow
def test_every_panel_has_data_and_every_rule_loads(watched):
    srv, prometheus = watched
    assert wait_for(lambda: [r["value"][1] for r in query(prometheus, 'up{job="torchserve"}')] == ["1"])
    good, bad = json.dumps(ORIGINAL), '{"history": [1, 2]}'
    stop_load = threading.Event()

    def load() -> None:  # traffic while a worker dies: its request may get "Worker died" (500)
        while not stop_load.is_set():
            post(srv, good)

    for _ in range(30):
        assert post(srv, good)[0] == 200
    for _ in range(5):
        assert post(srv, bad)[0] == 400
    loader = threading.Thread(target=load)
    loader.start()
    try:
        os.kill(workers(srv)[0], signal.SIGKILL)
        assert wait_for(lambda: query(prometheus, 'WorkerStarts{Start="restart"}'), 60)  # loaded again
    finally:
        stop_load.set()
        loader.join()
    # no worker for a moment: requests get 503 (Requests5XX)
    assert manage(srv, "/models/lstm?min_worker=0&max_worker=0&synchronous=true") == 200
    assert post(srv, good)[0] == 503
    assert manage(srv, "/models/lstm?min_worker=2&max_worker=2&synchronous=true") == 200
    assert wait_for(lambda: post(srv, good)[0] == 200)
    for _ in range(30):
        post(srv, good)

    def empty_panels() -> list[str]:
        # the served-quality row reads what the refresh job pushes: test_quality.py checks it
        return [expr for expr in dashboard_exprs() if not pushed(expr)
                and not any(math.isfinite(float(r["value"][1])) for r in query(prometheus, expr))]

    missing = wait_for(lambda: not empty_panels(), 90) or empty_panels()
    assert missing is True, f"panels without data: {missing}"

    groups = (api(prometheus, "rules") or {}).get("groups", [])
    loaded = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
    assert loaded == dict.fromkeys(ALERTS, "ok")
    # end to end, from the handler's metrics to an alert: the test model's closes end in the
    # bundled snapshot (> 5 trading days ago), and a worker was restarted
    def alerts() -> dict[str, str] | None:
        listed = (api(prometheus, "alerts") or {}).get("alerts", [])
        found = {a["labels"]["alertname"]: a["state"] for a in listed}
        return found if {"StockcastModelStale", "StockcastWorkerRestarted"} <= found.keys() else None

    states = wait_for(alerts, 30)
    assert states and states["StockcastModelStale"] == "pending", states
    assert states["StockcastWorkerRestarted"] == "firing", states
    restarts = query(prometheus, 'WorkerStarts{Start="restart"}')
    assert [float(r["value"][1]) for r in restarts] == [1.0]
