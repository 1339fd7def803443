"""The transform between prices and the network, written once: closes -> inputs (scaled log
returns) and outputs (scaled log returns of the next closes, or quantiles of the cumulative
move to each step) -> prices and intervals. Training, export and the
handler use it; the archive ships this file as stockcast_features.py, so the handler needs neither
Lightning nor stockcast. numpy only."""

from __future__ import annotations

import numpy as np

FEATURES = ["log_return"]  # the closes alone
# with each day's high-low range (Parkinson's volatility estimator reads it), and whether the day had
# one: a request without high/low, or a row without them, is answered with has_range 0
RANGE_FEATURES = ["log_return", "log_range", "has_range"]
ARCHIVED_AS = "stockcast_features.py"  # its name in lstm.mar, beside the handler


def log_returns(closes: np.ndarray) -> np.ndarray:
    """[..., N] closes -> [..., N-1] log returns; they do not change when all prices scale by k."""
    return np.diff(np.log(closes), axis=-1)


def usable_range(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Which days' high and low make a range: finite, 0 < low <= high (the loader and the handler)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(high) & np.isfinite(low) & (low > 0) & (high >= low)


def day_features(closes: np.ndarray, high: np.ndarray | None = None, low: np.ndarray | None = None,
                 n_features: int = 1) -> np.ndarray:
    """[..., N] closes (and highs and lows, NaN where unknown) -> [..., N-1, F] unscaled features of
    each return's day: its log return, and with F = 3 the day's log(high / low) (0 where unknown)
    and 1 where it is known. Each is unchanged when all prices scale by k."""
    returns = log_returns(closes)
    if n_features == 1:
        return returns[..., None]
    if high is None or low is None:
        log_range = np.full_like(returns, np.nan)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            log_range = np.log(np.asarray(high, dtype=np.float64) / np.asarray(low, dtype=np.float64))[..., 1:]
    known = np.isfinite(log_range) & (log_range >= 0)  # usable_range's days (NaN where not)
    return np.stack([returns, np.where(known, log_range, 0.0), known.astype(np.float64)], axis=-1)


def scale_features(features: np.ndarray, mean, scale) -> np.ndarray:
    """[..., F] unscaled features -> float32 network inputs, standardised with the training period's
    per-feature mean and scale (scaler.json); an unknown range stays 0 after scaling."""
    mean, scale = np.atleast_1d(mean), np.atleast_1d(scale)
    x = (features - mean) / scale
    if features.shape[-1] > 1:
        x[..., 1] *= features[..., 2]  # has_range 0: no information, not "a range of 0"
    return x.astype(np.float32)


def to_inputs(closes: np.ndarray, mean, scale, high: np.ndarray | None = None,
              low: np.ndarray | None = None) -> np.ndarray:
    """[B, T] closes (and optional highs and lows) -> [B, T-1, F] float32 network inputs, with F the
    number of features scaler.json has a mean for."""
    n_features = len(np.atleast_1d(mean))
    return scale_features(day_features(closes, high, low, n_features), mean, scale)


def input_returns(inputs: np.ndarray, mean, scale) -> np.ndarray:
    """[B, T-1, F] network inputs -> [B, T-1] the window's log returns (to_inputs undone), for the
    volatility baselines that read the same window."""
    return inputs[..., 0].astype(np.float64) * np.atleast_1d(scale)[0] + np.atleast_1d(mean)[0]


def to_prices(last_close: np.ndarray, outputs: np.ndarray, mean: float = 0.0,
              scale: float = 1.0) -> np.ndarray:
    """[B] last closes and [B, H] network outputs (standardised log returns of the next H closes;
    with mean 0 and scale 1, plain log returns) -> [B, H] closes."""
    returns = np.asarray(outputs, dtype=np.float64) * scale + mean
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the handler refuses
        return last_close[:, None] * np.exp(np.cumsum(returns, axis=1))


def quantile_prices(last_close: np.ndarray, outputs: np.ndarray, mean: float = 0.0,
                    scale: float = 1.0) -> np.ndarray:
    """[B] last closes and [B, H, Q] quantiles of the standardised cumulative log return to each
    step (the sum of h standardised returns: the mean h times) -> [B, H, Q] closes."""
    steps = np.arange(1, np.shape(outputs)[1] + 1)[None, :, None]
    cumulative = np.asarray(outputs, dtype=np.float64) * scale + mean * steps
    with np.errstate(over="ignore"):
        return last_close[:, None, None] * np.exp(cumulative)


def to_forecasts(last_close: np.ndarray, outputs: np.ndarray, mean: float, scale: float,
                 levels: list[float] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Network outputs -> ([B, H] point closes, [B, H, Q] quantile closes or None): a point
    network's [B, H] returns, or a quantile network's [B, H, Q] whose median is the point."""
    if not levels:
        return to_prices(last_close, outputs, mean, scale), None
    quantiles = quantile_prices(last_close, outputs, mean, scale)
    return quantiles[..., list(levels).index(0.5)], quantiles


def interval_pairs(levels: list[float]) -> list[tuple[float, int, int]]:
    """[(nominal coverage, lower index, upper index)] of the central intervals that `levels` holds,
    widest last: (0.025, 0.1, 0.5, 0.9, 0.975) -> [(0.8, 1, 3), (0.95, 0, 4)]."""
    levels = [round(float(x), 6) for x in levels]
    pairs = [(round(1 - 2 * lo, 6), i, levels.index(round(1 - lo, 6)))
             for i, lo in enumerate(levels) if lo < 0.5 and round(1 - lo, 6) in levels]
    return sorted(pairs)
