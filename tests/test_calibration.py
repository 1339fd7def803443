"""Conformal calibration on a simulated GARCH(1,1) series, where EWMA volatility is about right:
an interval made too narrow on purpose comes back to its nominal coverage on days it never saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stockcast.calibration import calibrate, conformal_factors
from stockcast.data import Windows
from stockcast.evaluation import LEVELS
from stockcast.model import LSTMNet


def garch_returns(n: int, seed: int) -> np.ndarray:
    """Daily returns of a GARCH(1,1) with normal innovations: omega 2e-6, alpha 0.06, beta 0.93."""
    rng = np.random.default_rng(seed)
    var, out = 2e-4, np.empty(n)
    for t in range(n):
        out[t] = np.sqrt(var) * rng.standard_normal()
        var = 2e-6 + 0.06 * out[t] ** 2 + 0.93 * var
    return out


def windows(returns: np.ndarray, window: int = 60) -> Windows:
    scale = returns.std()
    idx = np.arange(len(returns) - window + 1)[:, None] + np.arange(window)  # [N, T]: 59 in, 1 out
    x = (returns / scale).astype(np.float32)[idx]
    return Windows(x[:, :-1, None], x[:, -1:], np.ones(len(idx)), None, None)


def coverage(net: LSTMNet, w: Windows) -> dict[str, float]:
    with torch.no_grad():
        q = net(torch.from_numpy(w.inputs)).numpy()[:, 0]  # [N, Q]
    y = w.targets[:, 0]
    return {"80": float(np.mean((y >= q[:, 1]) & (y <= q[:, 3]))),
            "95": float(np.mean((y >= q[:, 0]) & (y <= q[:, 4])))}


def test_calibration_brings_a_too_narrow_interval_to_nominal_coverage():
    returns = garch_returns(12_000, seed=0)
    calibration, test = windows(returns[:6000]), windows(returns[6000:])
    net = LSTMNet(hidden_size=8, num_layers=1, levels=list(LEVELS)).eval()
    with torch.no_grad():
        net.head.bias.mul_(0.0).add_(torch.tensor([-1.0, -1.0, 0.0, -1.0, -1.0]))  # narrow gaps
    before = coverage(net, test)
    assert before["80"] < 0.7 and before["95"] < 0.85
    report = calibrate(net, calibration)
    after = coverage(net, test)
    assert after["80"] == pytest.approx(0.80, abs=0.02)
    assert after["95"] == pytest.approx(0.95, abs=0.01)
    assert report["n"] == len(calibration.inputs) and report["factors"][0][2] == 1.0
    assert report["share_below_after"][3] - report["share_below_after"][1] == pytest.approx(0.8, abs=0.01)


def test_conformal_factor_is_the_corrected_rank_of_the_scores():
    # an 80% interval [-1, 1] around median 0; outcomes -9..9 but 0 need factors |y|: the 80% level
    # needs the ceil(19 * 0.8) = 16th smallest of 1,1,2,2,...,9,9 (18 outcomes), which is 8
    y = np.array([v for v in range(-9, 10) if v], dtype=float)[:, None]  # [N, H]
    q = np.tile(np.array([-1.0, 0.0, 1.0]), (len(y), 1, 1))  # [N, H, Q]
    factors = conformal_factors(q, y, [0.1, 0.5, 0.9])
    assert factors.tolist() == [[8.0, 1.0, 8.0]]
    assert np.mean(np.abs(y) <= 8.0) >= 0.8  # and it covers
    # every outcome at the median: the interval shrinks to its floor, never to the other side
    assert conformal_factors(q, np.zeros_like(y), [0.1, 0.5, 0.9]).tolist() == [[0.05, 1.0, 0.05]]
