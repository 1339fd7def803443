"""Test helpers: HTTP against a running server, and which metrics the Grafana dashboard queries."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

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
