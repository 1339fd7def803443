"""Walk-forward backtest: fold boundaries, no look-ahead, a planted drift, its files and its CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, random_walk, write_flat_csv
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

import stockcast.backtest
from stockcast.backtest import COLUMNS, Fold, backtest, folds, quantile_columns, run_fold
from stockcast.evaluation import LEVELS
from stockcast.prices import DataError, load_prices

# tiny and quick: 20-close windows, 2 epochs of 4 batches, no logger
TINY = ["data.window=20", "data.start=2019-01-01", "trainer.max_epochs=2", "+trainer.limit_train_batches=4",
        "~logger", "backtest.start=2019-10-08", "backtest.step=30", "backtest.val=0.2"]
# on series(): 300 business days from 2019-01-01, origins at rows 200, 230, 260, 290


def series(tmp_path: Path, drift: float = 0.0003, noise: float = 0.02, n: int = 300) -> Path:
    """A business-day series from 2019-01-01 with mean daily log return `drift`, as a flat CSV."""
    walk = random_walk(n, start="2019-01-01", seed=1)
    returns = np.random.default_rng(1).normal(drift, noise, n)
    walk["close"] = 20 * np.exp(np.cumsum(returns))
    return write_flat_csv(tmp_path / "series.csv", walk)


def compose_backtest(tmp_path: Path, csv: Path, *overrides: str) -> DictConfig:
    """configs/backtest.yaml as backtest.py sees it on `csv`, writing only under `tmp_path`."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("backtest", overrides=["data.source=csv", f"paths.root={ROOT}",
                                             f"data.snapshot={csv}", *TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
    return cfg


def test_origins_every_step_from_start_and_folds_partition_the_targets():
    dates = pd.bdate_range("2018-01-01", periods=500)
    plan = folds(dates, window=60, horizon=3, start="2019-01-01", step=63, val=0.1)
    first = int(dates.searchsorted(pd.Timestamp("2019-01-01")))
    assert dates[plan[0].origin] == pd.Timestamp("2019-01-01")
    assert [f.origin for f in plan] == list(range(first, 500 - 3 + 1, 63))
    assert [f.index for f in plan] == list(range(len(plan)))
    # each fold forecasts up to the next origin; the last to the last target with all 3 steps
    assert [f.end for f in plan[:-1]] == [f.origin for f in plan[1:]]
    assert plan[-1].end == 500 - 3 + 1
    for f in plan:  # early stopping on the last 10% of the targets before the origin
        assert f.val_start == f.origin - round((f.origin - 60) * 0.1) and 60 < f.val_start < f.origin


@pytest.mark.parametrize(("start", "step", "val", "message"), [
    ("2030-01-01", 63, 0.1, "backtest.start 2030-01-01 leaves no target to forecast: the data ends"),
    ("2018-01-01", 63, 0.1, "backtest.start 2018-01-01 leaves 0 targets before the first origin "
                            "2018-01-01: too few to train on (window 60)"),
    ("2019-01-01", 0, 0.1, "backtest.step must be >= 1 and backtest.val in (0, 1) (got 0, 0.1)"),
    ("2019-01-01", 63, 1.5, "backtest.step must be >= 1 and backtest.val in (0, 1) (got 63, 1.5)"),
])
def test_bad_plans_are_one_line_errors(start, step, val, message):
    with pytest.raises(DataError) as err:
        folds(pd.bdate_range("2018-01-01", periods=500), 60, 1, start, step, val)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("horizon", [1, 3])
def test_no_fold_trains_or_stops_early_on_its_targets_or_later(tmp_path, monkeypatch, horizon):
    csv = series(tmp_path)
    cfg = compose_backtest(tmp_path, csv, f"data.horizon={horizon}", "backtest.n_jobs=1")
    seen = []

    def spy(cfg, datamodule):  # in-process (n_jobs=1): record what each fold was fit on, then fit
        seen.append((datamodule.splits, datamodule.scaler))
        return fit(cfg, datamodule)

    fit = stockcast.backtest.fit
    monkeypatch.setattr(stockcast.backtest, "fit", spy)
    backtest(cfg)
    dates = load_prices(csv).index
    rows = pd.read_csv(tmp_path / "run" / "backtest.csv", parse_dates=["origin", "target_date"])
    origins = rows.groupby("fold")["origin"].first()
    assert len(seen) == len(origins) >= 3
    for (splits, scaler), origin in zip(seen, origins, strict=True):
        # the date of each window's LAST target: H - 1 trading days after its first
        last = {k: dates[dates.searchsorted(w.dates) + horizon - 1] for k, w in splits.items()
                if k != "test"}
        assert last["train"].max() < splits["val"].dates[0] and last["val"].max() < origin
        assert splits["test"].dates[0] == origin
        # the scaler (and so the drift) saw only returns before the val split
        closes = load_prices(csv)["close"]
        mean = np.diff(np.log(closes[closes.index < splits["val"].dates[0]])).mean()
        assert scaler.mean_[0] == pytest.approx(mean, rel=1e-9)
    assert (rows["target_date"] >= rows["origin"]).all()


def test_what_follows_the_origin_cannot_change_the_fold(tmp_path):
    # scramble every close from the origin on: the fold's training, drift and its forecast for the
    # first target (made from closes before the origin) must not move
    csv = series(tmp_path)
    cfg = compose_backtest(tmp_path, csv)
    OmegaConf.resolve(cfg)
    frame = load_prices(csv)
    fold = Fold(index=0, val_start=200, origin=230, end=260)
    clean = run_fold(cfg, frame, fold, str(csv))
    scrambled = frame.copy()
    scrambled.iloc[230:, 0] *= np.random.default_rng(5).uniform(0.8, 1.25, len(frame) - 230)
    dirty = run_fold(cfg, scrambled, fold, str(csv))
    assert len(clean) == 30 and clean["target_date"].iloc[0] == frame.index[230]
    pd.testing.assert_series_equal(clean["model"].iloc[:1], dirty["model"].iloc[:1])
    assert clean["drift"].iloc[0] == dirty["drift"].iloc[0]
    ratio = clean["drift"] / clean["last_close"]
    assert np.allclose(ratio, ratio.iloc[0], rtol=1e-12, atol=0)  # one training drift per fold
    assert not np.allclose(clean["actual"], dirty["actual"])  # the scramble did reach the targets


def test_planted_drift_is_found_and_every_file_is_written(tmp_path):
    # +1% a day with 1% noise: the random walk with drift must beat tomorrow = today
    csv = series(tmp_path, drift=0.01, noise=0.01)
    record = backtest(compose_backtest(tmp_path, csv, "backtest.n_jobs=2"))
    assert record["drift"]["rmse"] < 0.8 * record["persistence"]["rmse"]
    assert record["drift"]["directional_accuracy"] > 0.8 and record["always_up"] > 0.8
    for out in (tmp_path / "run", tmp_path / "artifacts" / "backtest" / "petr4"):
        rows = pd.read_csv(out / "backtest.csv")
        expected = [c for c in quantile_columns(LEVELS) if not c.startswith("model_closes_only")]
        assert list(rows.columns) == COLUMNS + expected and len(rows) == record["n_test"]
        saved = json.loads((out / "backtest.json").read_text())
        assert {"mae_ratio", "mae_ratio_drift", "rmse_ratio", "rmse_ratio_drift", "dm_stat_persistence",
                "dm_p_persistence", "dm_stat_drift", "dm_p_drift", "always_up", "direction_p", "folds",
                "wall_time_s", "model", "persistence", "drift"} <= set(saved)
        assert set(saved["model"]) == {"mae", "rmse", "mape", "directional_accuracy"}
        assert len(saved["folds"]) == rows["fold"].nunique() >= 3 and saved["wall_time_s"] > 0
        assert 0 <= saved["dm_p_drift"] <= 1 and saved["rmse_ratio"] == pytest.approx(
            saved["model"]["rmse"] / saved["persistence"]["rmse"])
        assert (out / "backtest.png").read_bytes()[:4] == b"\x89PNG"
        # the interval baselines, from each window's own returns: the CSV's quantiles are ordered
        # and the JSON's coverage is what they give
        q = rows[[f"ewma_q{level}" for level in LEVELS]].to_numpy()
        assert (np.diff(q, axis=1) > 0).all() and np.allclose(q[:, 2], rows["last_close"])
        inside = ((rows["actual"] >= q[:, 1]) & (rows["actual"] <= q[:, 3])).mean()
        assert saved["intervals"]["ewma"]["coverage_80"] == pytest.approx(inside)
        assert set(saved["intervals"]) == {"model", "ewma", "historical"}
        assert "score_95_ratio_ewma" in saved["intervals"]["historical"]
        # the model's own quantiles (each fold's network), ordered, their median its point forecast
        m = rows[[f"model_q{level}" for level in LEVELS]].to_numpy()
        assert (np.diff(m, axis=1) > 0).all() and np.allclose(m[:, 2], rows["model"], rtol=1e-9)
        inside = ((rows["actual"] >= m[:, 0]) & (rows["actual"] <= m[:, 4])).mean()
        assert saved["intervals"]["model"]["coverage_95"] == pytest.approx(inside)
        assert "score_80_dm_p_ewma" in saved["intervals"]["model"]
    # every target day forecast once, in order, each by the fold whose origin precedes it
    assert rows["target_date"].is_monotonic_increasing and rows["target_date"].is_unique


def test_folds_are_seeded_parallel_equals_sequential(tmp_path):
    csv = series(tmp_path)
    one = backtest(compose_backtest(tmp_path / "one", csv, "backtest.n_jobs=1"))
    two = backtest(compose_backtest(tmp_path / "two", csv, "backtest.n_jobs=2"))
    assert one["folds"] == two["folds"] and one["model"] == two["model"]
    rows = pd.read_csv(tmp_path / "one" / "run" / "backtest.csv")
    assert not np.allclose(rows["model"], rows["drift"])  # trained: more than the drift


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "backtest.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_runs_end_to_end_and_prints_the_verdicts(tmp_path):
    csv = series(tmp_path)
    proc = run_cli("data.source=csv", f"data.snapshot={csv}", *TINY,
                   f"paths.artifacts_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "walk-forward PETR4.SA: 4 folds, horizon 1" in proc.stdout
    assert "no significant difference from tomorrow = today" in proc.stdout or "than tomorrow" in proc.stdout
    assert "vs always up" in proc.stdout and "Traceback" not in proc.stderr
    assert {p.name for p in (tmp_path / "a" / "backtest" / "petr4").iterdir()} == {
        "backtest.csv", "backtest.json", "backtest.png"}
    assert (tmp_path / "run" / "backtest.json").exists() and (tmp_path / "run" / "backtest.log").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("backtest.start=2030-01-01", "error: backtest.start 2030-01-01 leaves no target to forecast"),
    ("backtest.step=0", "error: backtest.step must be >= 1"),
    ("backtest.until=2021-13-45", r"error: backtest.until must be a date \(YYYY-MM-DD\) or null, "
                                  r"not '2021-13-45'"),
    # folds run in parallel: whichever fails first is reported
    ("trainer.max_epochs=0", r"error: fold \d \(origin 2019-\d\d-\d\d\): the run saved no checkpoint"),
])
def test_cli_errors_are_one_line(tmp_path, override, message):
    csv = series(tmp_path)
    proc = run_cli("data.source=csv", f"data.snapshot={csv}", *TINY, override,
                   f"paths.artifacts_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(message, errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists()


def backtest_main():
    """backtest.py's main without Hydra's command line: what a sweeper gets back from a trial."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("backtest_script", ROOT / "backtest.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main.__wrapped__


def test_until_ends_the_folds_and_main_returns_the_json_objective(tmp_path):
    # series(): origins at rows 200, 230, 260, 290 without until; until = row 265's date
    csv = series(tmp_path)
    dates = load_prices(csv).index
    until = f"{dates[265]:%Y-%m-%d}"
    cfg = compose_backtest(tmp_path, csv, "backtest.n_jobs=1", f"backtest.until={until}")
    objective = backtest_main()(cfg)
    saved = json.loads((tmp_path / "run" / "backtest.json").read_text())
    rows = pd.read_csv(tmp_path / "run" / "backtest.csv", parse_dates=["origin", "target_date"])
    assert [f["origin"] for f in saved["folds"]] == [f"{dates[i]:%Y-%m-%d}" for i in (200, 230, 260)]
    assert rows["origin"].max() <= pd.Timestamp(until) and rows["target_date"].max() == pd.Timestamp(until)
    assert saved["until"] == until and saved["data_end"] == until
    # the sweeper minimises the worse of the two ratios over these folds, as backtest.json says
    assert objective == saved["objective"] == max(saved["rmse_ratio"], saved["rmse_ratio_drift"])


def test_a_seed_ensemble_averages_its_members_forecast_returns(tmp_path):
    csv = series(tmp_path)
    frame = load_prices(csv)
    fold = Fold(index=0, val_start=200, origin=230, end=260)

    def forecast(*overrides: str) -> np.ndarray:
        cfg = compose_backtest(tmp_path, csv, *overrides)
        OmegaConf.resolve(cfg)
        return run_fold(cfg, frame, fold, str(csv))["model"].to_numpy()

    first, second = forecast("seed=42"), forecast("seed=1042")  # member k trains with seed + 1000 k
    both = forecast("seed=42", "backtest.seeds=2")
    assert not np.allclose(first, second, rtol=1e-6)
    np.testing.assert_allclose(both, np.sqrt(first * second), rtol=1e-6)
