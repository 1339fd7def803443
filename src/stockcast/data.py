"""Sliding windows of log returns, a chronological split and a train-fitted scaler, as a DataModule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from stockcast.features import FEATURES, RANGE_FEATURES, day_features, scale_features
from stockcast.prices import DataError, check_ticker, load_prices, resolve


@dataclass
class Windows:
    """One split: model inputs and targets (scaled returns) plus what evaluation needs in prices."""

    inputs: np.ndarray  # [N, T-1, F] scaled features (log returns, ranges) of the window's T days
    targets: np.ndarray  # [N, H] scaled log returns of the next H closes
    last_close: np.ndarray  # [N] the window's last close
    future: np.ndarray  # [N, H] the actual next H closes
    dates: pd.DatetimeIndex  # [N] date of each window's first target

    def __len__(self) -> int:
        return len(self.inputs)

    def dataset(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.inputs), torch.from_numpy(self.targets))


def split_points(dates: pd.DatetimeIndex, window: int, val: float | str,
                 test: float | str | None) -> tuple[int, int]:
    """Row indices where the val and test targets start; each is a date or a fraction of all
    targets; test None: no test split (it starts past the end)."""
    n_targets = len(dates) - window

    def from_date(value: str) -> int:
        return int(dates.searchsorted(pd.Timestamp(value)))

    if test is None:  # no test split: every target trains or validates (the served model's refit)
        test_start = len(dates)
    else:
        test_start = from_date(test) if isinstance(test, str) else window + round(n_targets * (1 - test))
    val_start = from_date(val) if isinstance(val, str) else test_start - round(n_targets * val)
    return val_start, test_start


def make_windows(frame: pd.DataFrame, window: int, horizon: int, val: float | str,
                 test: float | str | None, name: str = "data", center: float = 1.0,
                 features: list[str] = FEATURES) -> tuple[dict[str, Windows], StandardScaler]:
    """Split `frame.close` into train/val/test windows by target date and scale with train returns.
    `center`: the share of the training mean return the scaler subtracts (and predict() adds back
    to every forecast): 1 = the training drift, 0 = none (an untrained model is then persistence).
    The scaler's `train_mean_` keeps the full training mean (the drift baseline's). `features`:
    FEATURES (log returns) or RANGE_FEATURES (with each day's high-low range, from frame.high/low)."""
    features = list(features)
    if features not in (FEATURES, RANGE_FEATURES):
        raise DataError(f"data.features must be {FEATURES} or {RANGE_FEATURES}, not {features}")
    closes = frame["close"].to_numpy(dtype=np.float64)

    def too_few(counts: dict | None = None) -> None:
        per_split = f" (windows per split: {counts})" if counts else ""
        raise DataError(f"{name}: {len(closes)} rows are too few for window={window}, horizon={horizon} "
                        f"and the val/test split{per_split}; need well over {window + horizon + 2} rows")

    if len(closes) < window + horizon + 4:  # one window for each split at the very least
        too_few()
    val_start, test_start = split_points(frame.index, window, val, test)
    last = len(closes) if test is None else len(closes) - 1  # the latest a test split may start
    if not window < val_start < test_start <= last:
        span = f"{frame.index[0]:%Y-%m-%d} .. {frame.index[-1]:%Y-%m-%d}"
        raise DataError(f"{name}: the split val={val}, test={test} leaves no room for train, val and "
                        f"test in {len(closes)} rows ({span})")
    starts = np.arange(len(closes) - window - horizon + 1)  # window i covers closes[i : i + window]
    first_target = starts + window
    last_target = first_target + horizon - 1
    masks = {
        # a train window's targets all precede the first val target: nothing of val leaks into train
        "train": last_target < val_start,
        "val": (first_target >= val_start) & (last_target < test_start),
        "test": first_target >= test_start,
    }
    counts = {k: int(m.sum()) for k, m in masks.items()}
    if min(n for k, n in counts.items() if k != "test" or test is not None) < 1 or counts["train"] < 2:
        too_few(counts)
    high, low = (frame[c].to_numpy(dtype=np.float64) if c in frame else None for c in ("high", "low"))
    days = day_features(closes, high, low, len(features))  # [n-1, F]; days[k, 0] = log(close[k+1] / close[k])
    # fit on the days inside the training period only: fitting on all data leaks the future
    train_days = days[: val_start - 1]
    scaler = StandardScaler().fit(train_days[:, :1])
    scaler.train_mean_ = scaler.mean_.copy()
    if len(features) > 1:  # the range's statistics over the training days that have one
        known = train_days[:, 2] == 1
        if known.sum() < 2:
            raise DataError(f"{name}: data.features has log_range but the training period has "
                            f"{int(known.sum())} rows with High and Low")
        ranges = train_days[known, 1]
        scaler.mean_ = np.array([scaler.mean_[0], ranges.mean(), 0.0])
        scaler.scale_ = np.array([scaler.scale_[0], ranges.std() or 1.0, 1.0])
        scaler.train_mean_ = np.array([scaler.train_mean_[0], ranges.mean(), 0.0])
        scaler.var_, scaler.n_features_in_ = scaler.scale_**2, 3
    scaler.mean_[0] = scaler.mean_[0] * center  # scale_features() and predict() both use mean_
    scaled = scale_features(days, scaler.mean_, scaler.scale_)  # [n-1, F]
    idx_in = starts[:, None] + np.arange(window - 1)  # [N, T-1]
    idx_out = starts[:, None] + window - 1 + np.arange(horizon)  # [N, H]
    splits = {
        k: Windows(
            inputs=scaled[idx_in[m]],
            targets=scaled[idx_out[m], 0],
            last_close=closes[first_target[m] - 1],
            future=closes[idx_out[m] + 1],
            dates=frame.index[first_target[m]],
        )
        for k, m in masks.items()
    }
    return splits, scaler


class StockDataModule(L.LightningDataModule):
    """Daily closes of one ticker as windows of `window` closes -> the next `horizon` closes."""

    def __init__(
        self,
        ticker: str = "PETR4.SA",
        start: str = "2015-01-01",
        end: str = "2023-12-31",
        source: str = "auto",
        snapshot: str = "data/PETR4.SA.csv",
        cache_dir: str = "data/cache",
        window: int = 60,
        horizon: int = 1,
        val: float | str = 0.1,
        test: float | str | None = 0.2,
        batch_size: int = 64,
        on_suspicious: str = "warn",
        center: float = 1.0,
        features: list[str] | tuple[str, ...] = tuple(FEATURES),
    ) -> None:
        super().__init__()
        check_ticker(ticker)  # before any file is named after it
        if window < 3 or horizon < 1:
            raise DataError(f"window must be >= 3 and horizon >= 1 (got {window}, {horizon})")
        if on_suspicious not in ("warn", "error"):
            raise DataError(f"data.on_suspicious must be warn or error, not {on_suspicious!r}")
        if not 0.0 <= center <= 1.0:
            raise DataError(f"data.center must be in [0, 1] (the share of the training drift kept), "
                            f"got {center}")
        features = [str(f) for f in features]  # plain: checkpoints load with weights_only (no ListConfig)
        self.save_hyperparameters()
        self.splits: dict[str, Windows] = {}
        self.scaler: StandardScaler | None = None
        self.path: Path | None = None

    def prepare_data(self) -> None:
        if self.path is not None:  # Lightning calls this again in fit(): download once
            return
        hp = self.hparams
        self.path = resolve(hp.source, hp.ticker, hp.start, hp.end, Path(hp.cache_dir), Path(hp.snapshot))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.path is None:
            self.prepare_data()
        hp = self.hparams
        frame = load_prices(self.path, on_suspicious=hp.on_suspicious)
        frame = frame.loc[pd.Timestamp(hp.start) : pd.Timestamp(hp.end)]
        self.splits, self.scaler = make_windows(
            frame, hp.window, hp.horizon, hp.val, hp.test, name=str(self.path), center=hp.center,
            features=list(hp.features),
        )

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        # num_workers=0: the data is in memory and worker processes only slow it down here
        return DataLoader(self.splits[split].dataset(), batch_size=self.hparams.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
