"""Windows, the chronological split without leakage, and the train-only scaler."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, random_walk, write_flat_csv

from stockcast.data import StockDataModule, make_windows
from stockcast.features import log_returns, to_prices
from stockcast.prices import DataError, load_prices


@pytest.mark.parametrize("horizon", [1, 5])
def test_windows_shapes_and_targets_are_the_next_closes(walk, horizon):
    splits, scaler = make_windows(walk, window=60, horizon=horizon, val=0.1, test=0.2)
    closes = walk["close"].to_numpy()
    for w in splits.values():
        assert w.inputs.shape == (len(w), 59, 1) and w.targets.shape == (len(w), horizon)
        assert w.inputs.dtype == np.float32
    t = splits["test"]
    i = walk.index.get_loc(t.dates[0])  # first target row of the first test window
    assert t.last_close[0] == closes[i - 1]
    np.testing.assert_allclose(t.future[0], closes[i : i + horizon])
    # scaled targets invert to the actual future closes
    returns = t.targets.astype(np.float64) * scaler.scale_[0] + scaler.mean_[0]
    np.testing.assert_allclose(to_prices(t.last_close, returns), t.future, rtol=1e-5)


@pytest.mark.parametrize("horizon", [1, 5])
def test_no_val_or_test_target_falls_inside_a_training_target(walk, horizon):
    splits, _ = make_windows(walk, window=60, horizon=horizon, val=0.15, test=0.2)
    step = walk.index.freq or (walk.index[1] - walk.index[0])

    def target_dates(w):
        return {d + k * step for d in w.dates for k in range(horizon)}

    train, val, test = (target_dates(splits[s]) for s in ("train", "val", "test"))
    assert max(train) < min(val) and max(val) < min(test)
    assert not train & val and not train & test and not val & test


def test_date_split_starts_where_configured(walk):
    splits, _ = make_windows(walk, window=60, horizon=1, val="2020-10-01", test="2021-01-04")
    assert splits["val"].dates[0].strftime("%Y-%m-%d") == "2020-10-01"
    assert splits["test"].dates[0].strftime("%Y-%m-%d") == "2021-01-04"
    assert splits["train"].dates[-1] < splits["val"].dates[0]


def test_scaler_is_fitted_on_the_training_period_only():
    # a series that trends up only after the training period: a leak would shift the mean
    walk = random_walk(400)
    walk.iloc[300:, 0] = walk["close"].iloc[299] * np.exp(np.arange(1, 101) * 0.05)
    splits, scaler = make_windows(walk, window=60, horizon=1, val=0.1, test=0.2)
    train_end = walk.index.get_loc(splits["train"].dates[-1])  # last row a training target uses
    expected = log_returns(walk["close"].to_numpy()[: train_end + 1])
    assert scaler.mean_[0] == pytest.approx(expected.mean(), rel=1e-9)
    assert scaler.scale_[0] == pytest.approx(expected.std(), rel=1e-9)
    assert scaler.mean_[0] < 0.01 < log_returns(walk["close"].to_numpy()).mean()


def test_inputs_do_not_depend_on_the_price_level(walk):
    base, _ = make_windows(walk, 60, 1, 0.1, 0.2)
    scaled, _ = make_windows(walk.assign(close=walk["close"] * 100), 60, 1, 0.1, 0.2)
    np.testing.assert_allclose(base["test"].inputs, scaled["test"].inputs, atol=1e-6)


def test_too_few_rows_is_a_clear_error(walk):
    with pytest.raises(DataError, match=r"tiny.csv: 62 rows are too few for window=60, horizon=1"):
        make_windows(walk.iloc[:62], 60, 1, 0.1, 0.2, name="tiny.csv")


def test_datamodule_reads_the_bundled_snapshot_between_start_and_end():
    dm = StockDataModule(source="csv", snapshot=str(ROOT / "data" / "PETR4.SA.csv"),
                         start="2015-01-01", end="2023-12-31")
    dm.prepare_data()
    dm.setup()
    assert dm.splits["test"].dates[-1].strftime("%Y-%m-%d") == "2023-12-28"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 59, 1) and y.shape == (64, 1)
    rows = load_prices(ROOT / "data" / "PETR4.SA.csv").loc["2015":"2023"]
    assert sum(len(w) for w in dm.splits.values()) == len(rows) - 60  # with horizon 1, none lost


@pytest.mark.parametrize(("val", "test"), [("2021-01-04", "2020-10-01"), (0.1, "2030-01-01"),
                                           (0.9, 0.2)])
def test_an_impossible_split_is_a_clear_error(walk, val, test):
    with pytest.raises(DataError, match="leaves no room for train, val and test in 400 rows"):
        make_windows(walk, 60, 1, val, test, name="walk.csv")


@pytest.mark.parametrize("ticker", ["../x", "data/../../x", "..\\x"])
def test_a_ticker_with_path_separators_is_refused_before_any_file_is_named(tmp_path, ticker):
    with pytest.raises(DataError, match="is not a ticker symbol"):
        StockDataModule(ticker=ticker, source="auto", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_on_suspicious_error_stops_setup_and_warn_goes_on(tmp_path, caplog):
    frame = random_walk(300)
    frame.iloc[150, 0] *= 1000  # a misplaced decimal point
    path = write_flat_csv(tmp_path / "X.csv", frame)
    kwargs = dict(ticker="X", source="csv", snapshot=str(path), start="2019-01-01", end="2022-01-01")
    strict = StockDataModule(on_suspicious="error", **kwargs)
    with pytest.raises(DataError, match=f"{frame.index[150]:%Y-%m-%d} close .* its neighbours"):
        strict.setup()
    lenient = StockDataModule(**kwargs)
    lenient.setup()
    assert lenient.splits["test"] and "suspicious data" in caplog.text
    with pytest.raises(DataError, match="data.on_suspicious must be warn or error, not 'ignore'"):
        StockDataModule(on_suspicious="ignore", **kwargs)


@pytest.mark.parametrize("center", [0.0, 0.5, 1.0])
def test_center_sets_how_much_training_drift_is_added_back(walk, center):
    from stockcast.model import LSTMNet
    from stockcast.training import predict

    splits, scaler = make_windows(walk, window=60, horizon=3, val=0.1, test=0.2, center=center)
    _, full = make_windows(walk, window=60, horizon=3, val=0.1, test=0.2)
    mean = full.mean_[0]
    assert mean != 0 and scaler.train_mean_[0] == pytest.approx(mean, rel=1e-12)  # the drift baseline's
    assert scaler.mean_[0] == pytest.approx(center * mean, rel=1e-12, abs=0)
    assert scaler.scale_[0] == full.scale_[0]
    t = splits["test"]  # the targets still invert to the actual closes with the contract's formula
    returns = t.targets.astype(np.float64) * scaler.scale_[0] + scaler.mean_[0]
    np.testing.assert_allclose(to_prices(t.last_close, returns), t.future, rtol=1e-5)
    # the untrained network (its head starts at zero) forecasts persistence times center * drift
    forecast = predict(LSTMNet(horizon=3), t, scaler)[0]
    np.testing.assert_allclose(forecast, t.last_close[:, None] * np.exp(center * mean * np.arange(1, 4)),
                               rtol=1e-9)


def test_center_outside_0_1_is_a_clear_error():
    with pytest.raises(DataError, match=r"data.center must be in \[0, 1\].*got 1.5"):
        StockDataModule(center=1.5)


def test_range_features_scale_on_the_training_days_that_have_a_range(walk):
    frame = walk.assign(high=walk.close * 1.01, low=walk.close * 0.99)
    frame.iloc[100, frame.columns.get_loc("high")] = np.nan  # a day without its range
    splits, scaler = make_windows(frame, window=60, horizon=1, val=0.1, test=0.2,
                                  features=["log_return", "log_range", "has_range"])
    assert splits["train"].inputs.shape[-1] == 3 and len(scaler.mean_) == len(scaler.scale_) == 3
    assert scaler.mean_[1] == pytest.approx(np.log(1.01 / 0.99)) and scaler.mean_[2] == 0.0
    x = splits["train"].inputs
    # row 100's range is day 99 (the return into row 100); window 50 (rows 50..109) holds it at 49
    assert x[50, 49, 2] == 0.0 and x[50, 49, 1] == 0.0 and x[50, 48, 2] == 1.0 and x[50, 50, 2] == 1.0
    # the closes-only part is what it was without ranges
    closes_only, _ = make_windows(walk, window=60, horizon=1, val=0.1, test=0.2)
    np.testing.assert_allclose(x[..., 0], closes_only["train"].inputs[..., 0], rtol=1e-6)
    with pytest.raises(DataError, match="data.features must be"):
        make_windows(walk, window=60, horizon=1, val=0.1, test=0.2, features=["log_range"])
    with pytest.raises(DataError, match="0 rows with High and Low"):
        make_windows(walk, window=60, horizon=1, val=0.1, test=0.2,
                     features=["log_return", "log_range", "has_range"])
