"""The transform between prices and the network, written once: closes -> inputs (scaled log
returns) and outputs (scaled log returns of the next closes) -> prices. Training, export and the
handler use it; the archive ships this file as stockcast_features.py, so the handler needs neither
Lightning nor stockcast. numpy only."""

from __future__ import annotations

import numpy as np

FEATURES = ["log_return"]
ARCHIVED_AS = "stockcast_features.py"  # its name in lstm.mar, beside the handler


def log_returns(closes: np.ndarray) -> np.ndarray:
    """[..., N] closes -> [..., N-1] log returns; they do not change when all prices scale by k."""
    return np.diff(np.log(closes), axis=-1)


def to_inputs(closes: np.ndarray, mean: float, scale: float) -> np.ndarray:
    """[B, T] closes -> [B, T-1, F] float32 network inputs: the log returns, standardised with the
    training period's mean and scale (scaler.json)."""
    return ((log_returns(closes) - mean) / scale)[..., None].astype(np.float32)


def input_returns(inputs: np.ndarray, mean: float, scale: float) -> np.ndarray:
    """[B, T-1, F] network inputs -> [B, T-1] the window's log returns (to_inputs undone), for the
    volatility baselines that read the same window."""
    return inputs[..., 0].astype(np.float64) * scale + mean


def to_prices(last_close: np.ndarray, outputs: np.ndarray, mean: float = 0.0,
              scale: float = 1.0) -> np.ndarray:
    """[B] last closes and [B, H] network outputs (standardised log returns of the next H closes;
    with mean 0 and scale 1, plain log returns) -> [B, H] closes."""
    returns = np.asarray(outputs, dtype=np.float64) * scale + mean
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the handler refuses
        return last_close[:, None] * np.exp(np.cumsum(returns, axis=1))
