"""Test helpers: HTTP against a running server, and which metrics the Grafana dashboard queries."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from stockcast.serve import get

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = json.loads((ROOT / "examples" / "petr4_request.json").read_text())  # 60 PETR4 closes
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "stockcast.json"

# words PromQL reserves that look like identifiers but select no series
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "and", "or", "unless", "offset", "inf", "nan"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"\{[^}]*\}")  # {model_name="lstm"}: label names, not metrics
_RANGES = re.compile(r"\[[^\]]*\]")  # [1m], [5m:30s]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# a whole identifier (not a piece of one, nor the exponent in 1e3) that is not a function call
_IDENTIFIER = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*(?![\w:]|\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names one PromQL expression selects; names given as {__name__="..."} are not seen."""
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name.lower() not in _KEYWORDS}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every target's expr in a dashboard, including panels nested in rows."""
    dashboard = json.loads(path.read_text())
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    return [target.get("expr", "") for panel in panels for target in panel.get("targets", [])]


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    """All metric names the dashboard queries: each must appear in a live scrape of :8082."""
    return set().union(*(promql_metric_names(expr) for expr in dashboard_exprs(path)))


def post(target, body: bytes | str | None, content_type: str | None = "application/json",
         headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict | str]:
    """`body` to a URL, or to a Server's /predictions/lstm with its inference key."""
    if not isinstance(target, str):
        target, headers = url(target), {**target.headers(), **(headers or {})}
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(target, data=data, method=method, headers=headers or {})
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def scrape(server) -> str:
    return get(server.metrics)[1]


def counter(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def url(server) -> str:
    return f"{server.inference}/predictions/lstm"


# ---- a real Prometheus (and Pushgateway) on free ports, stopped by pid ---------------------------

def binary(name: str) -> str:
    """A Prometheus tool's path; a skip when absent on a laptop, a failure in CI (.ci/run installs it)."""
    import os
    import shutil

    import pytest

    if path := shutil.which(name):
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} missing in CI: .ci/run installs Debian's prometheus and prometheus-pushgateway")
    pytest.skip(f"{name} not installed: apt-get install prometheus prometheus-pushgateway")


@contextlib.contextmanager
def running(command: list[str], url: str, ready: str, timeout: float = 60):
    """`command` in its own process group, yielding `url` once `url + ready` answers 200; SIGTERM to
    exactly that group when the block ends, however it ends."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url + ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not answer on {url} (exit code {proc.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _answers(target: str) -> bool:
    try:
        return get(target, timeout=2)[0] == 200
    except OSError:
        return False


def running_prometheus(home: Path, config: dict):
    """A Prometheus with `config` (a prometheus.yml as a dict) and its data under `home`, on a free port."""
    from stockcast.serve import free_ports

    home.mkdir(parents=True, exist_ok=True)
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_ports(1)[0]
    return running([binary("prometheus"), f"--config.file={home / 'prometheus.yml'}",
                    f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                   f"http://127.0.0.1:{port}", "/-/ready")


def api(prometheus: str, path: str) -> dict | list:
    try:
        code, body = get(f"{prometheus}/api/v1/{path}", timeout=5)
    except OSError:
        return []
    return json.loads(body)["data"] if code == 200 else []


def query(prometheus: str, expr: str) -> list:
    return (api(prometheus, f"query?query={urllib.parse.quote(expr)}") or {}).get("result", [])


def wait_for(condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    return condition()


def pushed(expr: str) -> bool:
    """Does a dashboard query read what the refresh job pushes (stockcast_*), not TorchServe's metrics?"""
    return any(name.startswith("stockcast_") for name in promql_metric_names(expr))
