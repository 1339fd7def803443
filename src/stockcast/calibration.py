"""Conformal calibration of the quantile network on data it did not fit (its early-stopping split):
a scaled variant of conformalized quantile regression (Romano et al. 2019). Each central interval's
distances from the median are multiplied by the factor that makes it cover its nominal share on
that split, with the finite-sample correction, per horizon step; the factors live in the network
(`LSTMNet.calibration`), so the exported model serves calibrated quantiles."""

from __future__ import annotations

import math

import numpy as np
import torch

from stockcast.data import Windows
from stockcast.features import interval_pairs
from stockcast.model import LSTMNet


def conformal_factors(quantiles: np.ndarray, target: np.ndarray, levels: list[float]) -> np.ndarray:
    """[N, H, Q] quantiles and [N, H] outcomes (the same units) -> [H, Q] factors c such that each
    central interval, median -/+ c * its distances to the median, covers its nominal share of the
    outcomes (two-sided, one factor per interval, as CQR; conservative by the (n + 1) / n rank of
    split conformal prediction). Quantiles outside a central pair, the median too, keep factor 1."""
    n, horizon, q = quantiles.shape
    median = quantiles[..., levels.index(0.5)]  # [N, H]
    factors = np.ones((horizon, q))
    for coverage, lo, hi in interval_pairs(levels):
        # the smallest factor that covers each outcome: how far out it fell, in the interval's units
        need = np.maximum((median - target) / (median - quantiles[..., lo]),
                          (target - median) / (quantiles[..., hi] - median))  # [N, H]
        # 1-based; with fewer than coverage / (1 - coverage) outcomes (19 at 95%) the largest is
        # the best there is, and the guarantee is lost: fit() calibrates on a whole val split
        rank = min(n, math.ceil((n + 1) * coverage))
        factors[:, lo] = factors[:, hi] = np.sort(need, axis=0)[rank - 1]
    # a factor <= 0 would put a quantile on the wrong side of the median: it keeps a sliver
    return np.clip(factors, 0.05, None)


@torch.no_grad()
def calibrate(net: LSTMNet, windows: Windows) -> dict:
    """Set net.calibration from `windows` (data the net was not fit on); return what it did:
    the factors and the coverage of each quantile there before and after."""
    net.eval()
    x = torch.from_numpy(windows.inputs)
    net.calibration.fill_(1.0)
    raw = net(x).numpy()  # [N, H, Q]
    target = np.cumsum(windows.targets, axis=1)  # [N, H] the cumulative move, network units
    factors = conformal_factors(raw, target, net.levels)
    net.calibration.copy_(torch.from_numpy(factors).float())
    calibrated = net(x).numpy()

    def below(q: np.ndarray) -> list[float]:  # share of outcomes at or below each quantile
        return [round(float(v), 4) for v in np.mean(target[..., None] <= q, axis=(0, 1))]

    return {"method": "scaled split-conformal (CQR) on the early-stopping split", "n": len(x),
            # the val split's interval figures are then in-sample for the factors
            "val_intervals": "in-sample (the factors were fitted there)",
            "factors": np.round(factors, 4).tolist(), "levels": net.levels,
            "share_below_before": below(raw), "share_below_after": below(calibrated)}
