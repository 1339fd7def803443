"""train(cfg) on the real composed configs: artifacts, export round trip, seeds, errors, CLI."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FORCE,
    NO_BACKTEST,
    QUICK,
    ROOT,
    compose_train,
    forecast_from_export,
    quantiles_from_export,
    random_walk,
    write_flat_csv,
)
from hydra.utils import instantiate
from omegaconf import open_dict

from stockcast.export import sha256
from stockcast.model import LSTMForecaster
from stockcast.prices import DataError
from stockcast.training import RunError, git_state, train

METRIC_KEYS = {"mae", "rmse", "mape", "directional_accuracy"}
# the quickest run that still trains and saves a checkpoint (fast_dev_run saves none)
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
        "~logger", FORCE]


def strings(tree) -> list[str]:
    """Every string value in a JSON tree."""
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in strings(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in strings(v)]
    return [tree] if isinstance(tree, str) else []


@pytest.mark.parametrize("experiment", ["petr4", "vale3", "itub4"])
def test_every_experiment_composes_and_instantiates(tmp_path, experiment):
    cfg = compose_train(tmp_path, f"experiment={experiment}")
    assert cfg.name == experiment and cfg.data.ticker.lower().startswith(experiment)
    assert Path(cfg.data.snapshot).exists()
    assert cfg.model.horizon == cfg.data.horizon == 1
    dm = instantiate(cfg.data)
    dm.setup()
    assert min(len(w) for w in dm.splits.values()) > 100
    assert isinstance(instantiate(cfg.model), LSTMForecaster)
    assert [type(instantiate(c)).__name__ for c in cfg.callbacks.values()] == [
        "ModelCheckpoint", "EarlyStopping"]


def test_horizon_is_defined_once(tmp_path):
    cfg = compose_train(tmp_path, "experiment=petr4", "data.horizon=5")
    assert cfg.model.horizon == 5


def test_a_short_run_writes_every_artifact(tmp_path):
    cfg = compose_train(tmp_path, "experiment=petr4", *TINY)
    results = train(cfg)
    out = tmp_path / "artifacts" / "petr4"
    assert sorted(p.name for p in out.iterdir()) == [
        "forecast.png", "meta.json", "metrics.json", "model.onnx", "model.pt", "scaler.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"model", "persistence", "rmse_ratio", "ticker", "test_start",
                            "test_end", "n_test",  # the keys before significance, unchanged
                            "drift", "drift_mean_log_return", "rmse_ratio_drift",
                            "dm_stat_persistence", "dm_p_persistence", "dm_stat_drift", "dm_p_drift",
                            "always_up", "direction_p", "intervals"}
    assert set(metrics["model"]) == set(metrics["persistence"]) == set(metrics["drift"]) == METRIC_KEYS
    assert 0 <= metrics["dm_p_persistence"] <= 1 and 0 <= metrics["dm_p_drift"] <= 1
    # the volatility baselines' intervals on the test split (EWMA: 0.837 / 0.927 on PETR4)
    ewma = metrics["intervals"]["ewma"]
    assert 0.75 < ewma["coverage_80"] < 0.9 and 0.9 < ewma["coverage_95"] < 0.98 and ewma["width_95"] > 0
    assert metrics["intervals"]["historical"]["score_95_ratio_ewma"] > 0
    assert metrics["rmse_ratio_drift"] == pytest.approx(metrics["model"]["rmse"] / metrics["drift"]["rmse"])
    assert metrics == results["test"] and metrics["ticker"] == "PETR4.SA"
    assert metrics["rmse_ratio"] == pytest.approx(
        metrics["model"]["rmse"] / metrics["persistence"]["rmse"])
    assert (out / "forecast.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["window"] == 60 and meta["horizon"] == 1 and meta["features"] == ["log_return"]
    assert meta["versions"]["torch"].startswith("2.") and meta["versions"]["onnxruntime"]
    assert meta["sha256"] == {n: sha256(out / n) for n in ("model.pt", "model.onnx", "scaler.json")}
    assert (tmp_path / "run" / "artifacts" / "metrics.json").exists()  # the run folder's copy
    # no leftovers of the staged publish (the registry's lock file stays, as serve's does)
    assert [p.name for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".")] == [".petr4.lock"]


def test_meta_says_what_was_trained_on_when_and_from_which_commit(tmp_path):
    train(compose_train(tmp_path, "experiment=petr4", "seed=3", *TINY))
    meta = json.loads((tmp_path / "artifacts" / "petr4" / "meta.json").read_text())
    # no absolute paths: they say nothing on the machine that serves the model
    assert not [s for s in strings(meta) if s.startswith("/") or str(tmp_path) in s]
    assert meta["data"]["file"] == "data/PETR4.SA.csv"  # relative to paths.root
    assert meta["data"]["sha256"] == sha256(ROOT / "data" / "PETR4.SA.csv")
    # the served model is the refit on all data, in its own folder of the run
    assert meta["checkpoint"].startswith("refit/checkpoints/") and meta["checkpoint"].endswith(".ckpt")
    assert (tmp_path / "run" / meta["checkpoint"]).is_file()  # relative to the run folder
    assert meta["seed"] == 3
    trained_at = datetime.fromisoformat(meta["trained_at"])
    assert trained_at.utcoffset() == timedelta(0)
    assert timedelta(0) <= datetime.now(UTC) - trained_at < timedelta(minutes=10)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert meta["git_commit"] == head and len(head) == 40
    assert isinstance(meta["git_dirty"], bool)
    val, test = meta["metrics"]["val"], meta["metrics"]["test"]
    assert {"val_start", "val_end", "n_val"} <= set(val) and not [k for k in val if "test" in k]
    assert val["val_start"] == meta["data"]["report_target_dates"]["val"][0] < test["test_start"]
    assert (meta["ticker"], meta["window"], meta["horizon"], meta["scaler_file"]) == (
        "PETR4.SA", 60, 1, "scaler.json")  # what the handler reads


def test_drift_baseline_takes_the_training_periods_mean_return(tmp_path):
    # planted: +0.3% a day until 2018-10, then -0.3% a day through val and test
    walk = random_walk(700, start="2016-01-01", seed=2)
    returns = np.random.default_rng(2).normal(0, 0.01, 700) + np.where(np.arange(700) < 480, 0.003, -0.003)
    walk["close"] = 20 * np.exp(np.cumsum(returns))
    csv = write_flat_csv(tmp_path / "planted.csv", walk)
    results = train(compose_train(tmp_path, f"data.snapshot={csv}", "data.start=2016-01-01", *TINY))
    test = results["test"]
    closes = walk["close"]
    val_start = json.loads((tmp_path / "artifacts" / "petr4" / "meta.json").read_text())[
        "data"]["report_target_dates"]["val"][0]
    train_mu = np.diff(np.log(closes[closes.index < val_start])).mean()
    assert test["drift_mean_log_return"] == pytest.approx(train_mu, rel=1e-9) and train_mu > 0.002
    assert np.diff(np.log(closes[closes.index >= test["test_start"]])).mean() < -0.002
    # the drift forecast rises every day, as the training period did, although the test split falls
    assert test["drift"]["directional_accuracy"] == test["always_up"] < 0.45
    assert results["val"]["drift_mean_log_return"] == test["drift_mean_log_return"]


def test_git_state_is_null_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) == (None, None)


def test_name_follows_the_ticker_unless_set(tmp_path):
    def name(*overrides: str) -> str:
        return compose_train(tmp_path, *overrides).name

    assert name() == "petr4"
    assert name("data.ticker=VALE3.SA") == "vale3"
    assert name("experiment=petr4", "data.ticker=VALE3.SA") == "vale3"  # never artifacts/petr4
    assert [name(f"experiment={e}") for e in ("petr4", "vale3", "itub4")] == ["petr4", "vale3", "itub4"]
    assert name("data.ticker=VALE3.SA", "name=vale3_h5") == "vale3_h5"


class Console(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty):
    cfg = compose_train(tmp_path, "experiment=petr4", *TINY)
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = None  # as configs/trainer/default.yaml ships it
    console = Console(tty)
    monkeypatch.setattr(sys, "stdout", console)
    train(cfg)
    assert ("Epoch 0" in console.getvalue()) is tty


@pytest.mark.parametrize("overrides", [["trainer.max_epochs=0"], ["+trainer.fast_dev_run=true"]])
def test_a_run_that_did_not_train_publishes_nothing(tmp_path, overrides):
    saved = tmp_path / "artifacts" / "petr4" / "metrics.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"saved": "earlier run"}')
    with pytest.raises(RunError, match=r"the run saved no checkpoint \(.*epochs: .*\): nothing to "
                                       r"evaluate or publish, .*artifacts/petr4 is left as it was"):
        train(compose_train(tmp_path, "experiment=petr4", *overrides))
    assert saved.read_text() == '{"saved": "earlier run"}'
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["petr4"]
    assert not (tmp_path / "run" / "artifacts").exists()


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("model.loss=mae", RunError, "model: model.loss must be huber, mse or pinball, not 'mae'"),
        ("model.hidden_size=abc", RunError, "model: TypeError: hidden_size should be of type int"),
        ("callbacks.early_stopping.patience=${nope}", RunError,
         "callbacks.early_stopping: Interpolation key 'nope' not found"),
        ("data.on_suspicious=ignore", DataError, "data.on_suspicious must be warn or error"),
        ("data.window=2", DataError, "window must be >= 3 and horizon >= 1 (got 2, 1)"),
        ("name=../../etc", RunError, "name '../../etc' must be a plain folder name"),
        ("gate.min_forecasts=abc", RunError, "gate.min_forecasts must be a number, not 'abc'"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(tmp_path, override, error, message):
    with pytest.raises(error) as err:
        train(compose_train(tmp_path, "experiment=petr4", override, *TINY))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("horizon, loss, calibrate", [(1, "pinball", True), (5, "pinball", False),
                                                     (5, "huber", False)])
def test_export_round_trip_matches_the_lightning_checkpoint(tmp_path, horizon, loss, calibrate):
    cfg = compose_train(tmp_path, "experiment=petr4", f"data.horizon={horizon}", f"model.loss={loss}",
                        f"model.calibrate={calibrate}", *QUICK)
    train(cfg)
    out = tmp_path / "artifacts" / "petr4"
    meta = json.loads((out / "meta.json").read_text())
    forecaster = LSTMForecaster.load_from_checkpoint(tmp_path / "run" / meta["checkpoint"]).eval()
    if calibrate:  # the checkpoint holds the conformal factors meta.json reports (rounded there)
        factors = forecaster.net.calibration.numpy()
        np.testing.assert_allclose(factors, meta["calibration"]["factors"], atol=1e-4)
        assert meta["calibration"]["n"] > 100 and not np.allclose(factors, 1.0)
    else:
        assert meta["calibration"] is None and (forecaster.net.calibration == 1).all()
    scaler = json.loads((out / "scaler.json").read_text())
    history = 30 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.02, (6, 80)), axis=1))
    # the reference: the checkpointed LightningModule, with the scaler applied by hand
    x = (np.diff(np.log(history[:, -60:]), axis=1) - scaler["mean"][0]) / scaler["scale"][0]
    with torch.no_grad():
        y = forecaster(torch.tensor(x[..., None], dtype=torch.float32)).double().numpy()
    mean, scale = scaler["mean"][0], scaler["scale"][0]
    if loss == "pinball":  # quantiles of the cumulative move to each step; the median is the point
        assert y.shape == (6, horizon, 5) and meta["levels"] == [0.025, 0.1, 0.5, 0.9, 0.975]
        quantiles = history[:, -1:, None] * np.exp(y * scale + mean * np.arange(1, horizon + 1)[:, None])
        np.testing.assert_allclose(quantiles_from_export(out, history), quantiles, rtol=1e-5)
        expected = quantiles[..., 2]
    else:
        assert meta["levels"] == [] and meta["calibration"] is None
        expected = history[:, -1:] * np.exp(np.cumsum(y * scale + mean, 1))
    got = forecast_from_export(out, history)
    assert got.shape == (6, horizon)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert not np.allclose(got, history[:, -1:], rtol=1e-4)  # trained: not a bare persistence


def test_same_seed_gives_the_same_metrics(tmp_path):
    first = train(compose_train(tmp_path / "a", "experiment=petr4", *QUICK))
    second = train(compose_train(tmp_path / "b", "experiment=petr4", *QUICK))
    third = train(compose_train(tmp_path / "c", "experiment=petr4", "seed=7", *QUICK))
    registry = ("version", "gate", "promoted")  # each run is a new version
    assert {k: v for k, v in first.items() if k not in registry} == {
        k: v for k, v in second.items() if k not in registry}
    assert int(second["version"]) == int(first["version"]) + 1
    assert first["test"]["model"] != third["test"]["model"]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_file_is_one_line_and_keeps_previous_artifacts(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Date,Close,Volume\n2020-01-01,10,1\n2020-01-02,ten,1\n")
    saved = tmp_path / "artifacts" / "petr4" / "metrics.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"saved": "by the user"}')
    proc = run_cli("experiment=petr4", "data.source=csv", f"data.snapshot={bad}",
                   f"paths.artifacts_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}, line 3: Close is not a number ('ten')"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert saved.read_text() == '{"saved": "by the user"}'


def test_cli_too_few_rows_names_the_file(tmp_path):
    short = write_flat_csv(tmp_path / "short.csv", random_walk(50, start="2016-01-01"))
    proc = run_cli("experiment=petr4", "data.source=csv", f"data.snapshot={short}",
                   f"paths.artifacts_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {short}: 50 rows are too few for window=60")
    assert "Traceback" not in proc.stderr


def test_cli_errors_inside_instantiate_are_one_line(tmp_path):
    # raised inside StockDataModule.__init__, which Hydra's instantiate wraps; the ticker would
    # have named data/../x.csv, data/cache/../x_*.csv and artifacts/../x
    proc = run_cli("data.source=csv", "data.ticker=../x", f"paths.artifacts_dir={tmp_path / 'a'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: data.ticker '../x' is not a ticker symbol like PETR4.SA or ^BVSP "
        "(letters, digits and . ^ = _ - only)"]
    for noise in ("Traceback", "InstantiationException", "Error in call to target", "HYDRA_FULL_ERROR"):
        assert noise not in proc.stdout + proc.stderr
    assert not (tmp_path / "a").exists()


def test_cli_untrained_run_refuses_to_publish(tmp_path):
    saved = tmp_path / "a" / "petr4" / "metrics.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"saved": "by the user"}')
    proc = run_cli("experiment=petr4", "data.source=csv", "trainer.max_epochs=0",
                   f"paths.artifacts_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: the run saved no checkpoint (epochs: 0, steps: 0): nothing to evaluate or publish, "
        f"{tmp_path / 'a' / 'petr4'} is left as it was"]
    assert "better" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert saved.read_text() == '{"saved": "by the user"}'


def test_cli_piped_run_is_quiet_names_artifacts_after_the_ticker_and_logs_the_result(tmp_path):
    proc = run_cli("data.ticker=VALE3.SA", "data.source=csv", *TINY,
                   f"paths.artifacts_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "a").iterdir() if p.suffix != ".lock"] == ["vale3"]  # not petr4
    # stdout is a pipe: no progress bar (a full run printed ~70 KB of it), the result table stays
    assert "\r" not in proc.stdout and "Epoch" not in proc.stdout and len(proc.stdout) < 2000
    assert "test VALE3.SA" in proc.stdout and "rmse_ratio" in proc.stdout
    # "better" only with DM p < 0.05, whatever the ratio
    verdicts = re.findall(r"(better than|worse than|no significant difference from) tomorrow = today "
                          r"\(DM p = ([0-9.e-]+)\)", proc.stdout)
    assert len(verdicts) == 1 and (verdicts[0][0] == "no significant difference from") == (
        float(verdicts[0][1]) >= 0.05)
    assert "the random walk with drift (DM p = " in proc.stdout and "vs always up" in proc.stdout
    log = (tmp_path / "run" / "train.log").read_text()  # Hydra's run log was empty
    assert "test VALE3.SA" in log and "persistence" in log and "val rmse_ratio" in log


@pytest.mark.slow
def test_multirun_trains_every_experiment(tmp_path):
    proc = run_cli("-m", "experiment=petr4,vale3,itub4", "data.source=csv", "trainer.max_epochs=1", FORCE,
                   "+trainer.limit_train_batches=2", f"paths.artifacts_dir={tmp_path / 'a'}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tickers = {n: json.loads((tmp_path / "a" / n / "metrics.json").read_text())["ticker"]
               for n in ("petr4", "vale3", "itub4")}
    assert tickers == {"petr4": "PETR4.SA", "vale3": "VALE3.SA", "itub4": "ITUB4.SA"}


@pytest.mark.slow
def test_full_petr4_run_beats_persistence(tmp_path):
    results = train(compose_train(tmp_path, "experiment=petr4", NO_BACKTEST))  # the report, not the gate
    test = results["test"]
    assert test["test_start"] >= "2022-04-01" and test["test_end"] == "2023-12-28"
    assert test["rmse_ratio"] <= 1.0, test
    assert results["val"]["rmse_ratio"] <= 1.0, results["val"]


def test_auto_source_tries_yfinance_once_per_run(tmp_path, monkeypatch, capsys):
    import pandas as pd
    import yfinance as yf

    calls = []
    monkeypatch.setattr(yf, "download", lambda *a, **k: calls.append(a) or pd.DataFrame())
    train(compose_train(tmp_path, "experiment=petr4", "data.source=auto",
                        f"data.cache_dir={tmp_path / 'cache'}", *TINY))
    assert len(calls) == 1  # Lightning calls prepare_data again inside fit()
    assert capsys.readouterr().out.count("yfinance unavailable") == 1


def test_a_run_failing_while_exporting_keeps_the_previous_artifacts(tmp_path, monkeypatch):
    import stockcast.training

    saved = tmp_path / "artifacts" / "petr4" / "metrics.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"saved": "earlier run"}')

    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stockcast.training, "plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        train(compose_train(tmp_path, "experiment=petr4", *TINY))
    assert saved.read_text() == '{"saved": "earlier run"}'
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["petr4"]  # no half-written copy
