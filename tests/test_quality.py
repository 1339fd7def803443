"""Scoring what was served (stockcast.quality): the rolling figures by hand, the replayed forecasts
against the real handler's answers, the refresh alert over a real week, and the figures pushed to a
real Pushgateway, scraped by a real Prometheus that fires the coverage alert."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import binary, dashboard_exprs, pushed, query, running, running_prometheus, wait_for
from test_handler import load_service, predict

from stockcast import quality
from stockcast.prices import load_prices
from stockcast.serve import free_ports

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PETR4 = load_prices(ROOT / "data" / "PETR4.SA.csv")


def hand_scored() -> pd.DataFrame:
    """Four scored days, out of date order: errors small enough to square in one's head."""
    rows = pd.DataFrame({
        "date": pd.to_datetime(["2024-01-04", "2024-01-02", "2024-01-05", "2024-01-03"]),
        "actual":      [9.0, 10.0, 10.0, 11.0],
        "forecast":    [9.5, 10.5, 10.0, 10.5],   # errors (by date) +.5 -.5 +.5 0
        "persistence": [11.0, 9.0, 9.0, 10.0],    # -1 -1 +2 -1
        "drift":       [10.0, 9.0, 9.0, 10.0],    # -1 -1 +1 -1
        "lower_80":    [9.6, 9.5, 9.0, 10.0],     # inside: yes yes no yes
        "upper_80":    [10.0, 10.5, 11.0, 12.0],
        "lower_95":    [9.0, 9.0, 10.0, 9.0],     # inside: yes yes yes (bound) yes (bound)
        "upper_95":    [11.0, 11.0, 10.0, 13.0],
    })
    rows["target_date"] = rows["date"] + pd.Timedelta(days=1)
    rows["version"], rows["last_close"] = "1", rows["persistence"]
    return rows


def test_rolling_figures_equal_a_hand_computation() -> None:
    every = quality.rolling(hand_scored(), 60)
    assert every["n"] == 4
    assert every["rmse_model"] == pytest.approx(math.sqrt(0.75 / 4))  # 0.433
    assert every["rmse_persistence"] == pytest.approx(math.sqrt(7 / 4))  # 1.323
    assert every["rmse_drift"] == pytest.approx(1.0)
    assert every["rmse_ratio_persistence"] == pytest.approx(math.sqrt(0.75 / 7))  # 0.327
    assert every["rmse_ratio_drift"] == pytest.approx(math.sqrt(0.75 / 4))
    assert every["coverage_80"] == pytest.approx(0.75) and every["coverage_95"] == pytest.approx(1.0)
    last_two = quality.rolling(hand_scored(), 2)  # 2024-01-04 and -05: errors +.5, 0; -1, +2 (persistence)
    assert last_two["n"] == 2 and last_two["rmse_model"] == pytest.approx(math.sqrt(0.125))
    assert last_two["rmse_ratio_persistence"] == pytest.approx(math.sqrt(0.125 / 2.5))
    assert last_two["coverage_80"] == pytest.approx(0.5) and last_two["coverage_95"] == pytest.approx(1.0)


def test_volatility_ratio_is_recent_std_over_the_training_one(tmp_path: Path) -> None:
    (tmp_path / "scaler.json").write_text(json.dumps({"mean": [0.0], "scale": [0.01]}))
    moves = np.r_[np.zeros(30), np.tile([0.02, -0.02], 10)]  # quiet, then the last 20: +-2%
    frame = pd.DataFrame({"close": 10 * np.exp(np.cumsum(np.r_[0.0, moves]))},
                         index=pd.bdate_range("2024-01-01", periods=51))
    # sample std of +-0.02 (mean 0) over 20 returns: 0.02 * sqrt(20 / 19); training std 0.01
    assert quality.volatility_ratio(frame, tmp_path) == pytest.approx(2 * math.sqrt(20 / 19))


def test_grouping_key_and_exposition_name_every_figure(artifacts) -> None:
    assert quality.grouping_path("stockcast_refresh", "PETR4.SA") == \
        f"/metrics/job/stockcast_refresh/ticker@base64/{base64.urlsafe_b64encode(b'PETR4.SA').decode()}"
    assert quality.grouping_path("j", "^BVSP").endswith("/ticker@base64/XkJWU1A=")
    assert quality.grouping_path("j", "VALE3") == "/metrics/job/j/ticker/VALE3"
    serving = [("7", "2020-01-01", artifacts)]
    text = quality.exposition(PETR4.tail(100), serving, hand_scored(), succeeded_at=1700000000.0)
    assert 'stockcast_served_rmse_ratio{window="60",baseline="persistence"} ' in text
    assert 'stockcast_served_interval_coverage{window="20",level="80"} 0.75' in text
    assert 'stockcast_served_forecasts_scored{window="60"} 4.0' in text
    assert 'stockcast_served_version_info{version="7",since="2020-01-01",trained_through="' in text
    assert "stockcast_refresh_last_success_timestamp_seconds 1700000000.0" in text
    assert "stockcast_refresh_last_close_timestamp_seconds 1735516800.0" in text  # 2024-12-30
    assert "stockcast_input_volatility_ratio" in text


def test_push_to_nothing_is_one_clear_line() -> None:
    (port,) = free_ports(1)
    expected = f"cannot reach the Pushgateway at http://127.0.0.1:{port}"
    with pytest.raises(quality.PushError, match=expected) as err:
        quality.push(f"http://127.0.0.1:{port}", "PETR4.SA", "x 1\n", timeout=2)
    assert "\n" not in str(err.value)


def test_each_day_is_scored_by_the_version_serving_it(artifacts) -> None:
    window = json.loads((artifacts / "meta.json").read_text())["window"]
    frame = PETR4.iloc[:window + 20]
    serving = [("b", frame.index[window + 9], artifacts), ("a", frame.index[0], artifacts)]
    scored = quality.score(frame, serving)
    # days 0 .. window-2 have too few closes, and the last day no next close
    assert list(scored["date"]) == list(frame.index[window - 1 : -1])
    assert list(scored["version"]) == ["a"] * 10 + ["b"] * 10
    assert (scored["target_date"].to_numpy() == frame.index[window:].to_numpy()).all()
    np.testing.assert_array_equal(scored["actual"], frame["close"].iloc[window:])
    np.testing.assert_array_equal(scored["persistence"], frame["close"].iloc[window - 1 : -1])
    meta = json.loads((artifacts / "meta.json").read_text())
    drift = (meta.get("refit") or meta["metrics"]["test"])["drift_mean_log_return"]
    np.testing.assert_allclose(scored["drift"], scored["persistence"] * math.exp(drift), rtol=1e-12)
    assert (scored["lower_95"] <= scored["lower_80"]).all()
    assert (scored["upper_80"] <= scored["upper_95"]).all()
    assert quality.score(frame, [("late", frame.index[-1], artifacts)]).empty  # no next close yet


@pytest.fixture(scope="module")
def service(mar, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality-unpacked")
    zipfile.ZipFile(mar).extractall(folder)
    return load_service(folder)


def test_replayed_forecasts_are_what_the_handler_serves(service, artifacts) -> None:
    window = json.loads((artifacts / "meta.json").read_text())["window"]
    frame = PETR4.tail(window + 30)
    scored = quality.score(frame, [("1", frame.index[0], artifacts)])
    assert len(scored) == 30
    closes = frame["close"].to_numpy()
    # one request of 30 instances: the handler's one forward pass over the same batch
    histories = [{"history": closes[i - window + 1 : i + 1].tolist()}
                 for i in range(window - 1, len(closes) - 1)]
    [(status, body)] = predict(service, {"instances": histories})
    assert status == 200
    served = body["predictions"]
    np.testing.assert_allclose(scored["forecast"], [a["forecast"][0] for a in served], rtol=1e-9, atol=0)
    for level, name in ((0.8, "80"), (0.95, "95")):
        bounds = [next(i for i in a["intervals"] if i["level"] == level) for a in served]
        for side in ("lower", "upper"):
            got = [b[side][0] for b in bounds]
            np.testing.assert_allclose(scored[f"{side}_{name}"], got, rtol=1e-9, atol=0)


def refresh_rule() -> dict:
    (rule,) = [r for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
               for r in g["rules"] if r.get("alert") == "StockcastRefreshMissing"]
    return rule


def test_refresh_alert_over_a_week_of_missed_refreshes(tmp_path: Path) -> None:
    """The shipped rule alone (the whole file over 8 simulated days takes ~40 s): Friday 1970-01-02's
    close scored, then nothing; quiet on Sunday, Monday morning and Thursday, firing on Friday."""
    rules = {"groups": [{"name": "g", "rules": [refresh_rule()]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    quiet = [{"eval_time": t, "alertname": "StockcastRefreshMissing", "exp_alerts": []}
             for t in ("3d10h", "4d10h", "7d22h")]
    firing = {"eval_time": "8d2h", "alertname": "StockcastRefreshMissing", "exp_alerts": [{
        "exp_labels": {"severity": "warning", "job": "stockcast_refresh", "ticker": "PETR4.SA"},
        "exp_annotations": {**refresh_rule()["annotations"],
                            "summary": "PETR4.SA: 4 trading days' closes not scored (no successful "
                                       "refresh)"}}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "5m", "alert_rule_test": [*quiet, firing], "input_series": [{
            "series": 'stockcast_refresh_last_close_timestamp_seconds{job="stockcast_refresh", '
                      'ticker="PETR4.SA"}',
            "values": "86400x2500"}]}]}))
    run = subprocess.run([binary("promtool"), "test", "rules", "test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


@pytest.mark.slow
def test_pushed_figures_reach_prometheus_and_a_coverage_collapse_fires(artifacts, tmp_path: Path) -> None:
    """A real Pushgateway and a real Prometheus (1 s scrapes and evaluations; the shipped rules with
    their `for` removed): every pushed dashboard query has a value, and the 80% coverage alert fires
    for the ticker whose intervals collapsed, not for the other."""
    serving = [("1", PETR4.index[-61], artifacts)]
    scored = quality.score(PETR4, serving)
    assert len(scored) == 60
    collapsed = scored.assign(lower_80=scored["forecast"], upper_80=scored["forecast"])  # width 0
    healthy = scored.assign(lower_80=0.0, upper_80=1e9)  # every close inside
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("for", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pushgateway"]
    (port,) = free_ports(1)
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    config["scrape_configs"] = [job]
    # its own persistence file: Debian's build defaults to one shared /var/lib/prometheus/pushgateway.data
    gateway_command = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
                       f"--persistence.file={tmp_path / 'pushgateway.data'}"]
    with running(gateway_command, f"http://127.0.0.1:{port}", "/-/ready") as gateway, \
            running_prometheus(tmp_path / "prometheus", config) as prometheus:
        quality.push(gateway, "PETR4.SA", quality.exposition(PETR4, serving, collapsed))
        quality.push(gateway, "VALE3.SA", quality.exposition(PETR4, serving, healthy))

        def firing() -> list[str]:
            alerts = 'ALERTS{alertname="StockcastIntervalCoverageLow", alertstate="firing"}'
            return [r["metric"]["ticker"] for r in query(prometheus, alerts)]

        assert wait_for(firing, 60) == ["PETR4.SA"]
        coverage = query(prometheus, 'stockcast_served_interval_coverage{window="60", level="80"}')
        by_ticker = {r["metric"]["ticker"]: float(r["value"][1]) for r in coverage}
        assert by_ticker == {"PETR4.SA": 0.0, "VALE3.SA": 1.0}
        assert {r["metric"]["job"] for r in coverage} == {quality.JOB}  # honor_labels: the pushed job
        exprs = [e for e in dashboard_exprs() if pushed(e)]
        assert len(exprs) == 5
        for expr in exprs:
            values = [float(r["value"][1]) for r in query(prometheus, expr)]
            assert values and all(math.isfinite(v) for v in values), expr


def test_a_pushgateway_url_without_its_scheme_is_one_clear_line() -> None:
    with pytest.raises(quality.PushError, match=r"'127.0.0.1:9091' needs its scheme: http://HOST:PORT"):
        quality.push("127.0.0.1:9091", "PETR4.SA", "")
