"""Baselines and significance: drift, Diebold-Mariano (HLN), binomial direction test, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stockcast.evaluation import (
    LEVELS,
    always_up,
    compare,
    compare_intervals,
    diebold_mariano,
    direction_p,
    dm_test,
    drift_forecast,
    ewma_quantiles,
    ewma_sigma,
    historical_quantiles,
    interval_scores,
    persistence_forecast,
    table,
)


def dm_by_hand(d: list[float], h: int) -> tuple[float, float]:
    """The textbook HLN-corrected DM statistic written out with loops, for an independent check."""
    n = len(d)
    mean = sum(d) / n
    gamma = []
    for k in range(h):
        gamma.append(sum((d[t] - mean) * (d[t - k] - mean) for t in range(k, n)) / n)
    dm = mean / math.sqrt((gamma[0] + 2 * sum(gamma[1:])) / n)
    stat = dm * math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    return stat, 2 * (1 - stats.t.cdf(abs(stat), n - 1))


def test_dm_worked_example_matches_the_closed_form():
    # loss differences d = 1, 2, 3, 4 (model squared error minus baseline's), h = 1:
    # mean 2.5, gamma0 = 1.25, DM = 2.5 / sqrt(1.25 / 4) = sqrt(20), HLN sqrt(3 / 4) -> sqrt(15)
    actual = np.zeros(4)
    stat, p = diebold_mariano(np.sqrt([1.0, 2.0, 3.0, 4.0]), np.zeros(4), actual)
    assert stat == pytest.approx(math.sqrt(15))
    # Student t with 3 df has a closed-form CDF: 1/2 + (x / (1 + x^2) + atan(x)) / pi, x = t / sqrt(3)
    x = math.sqrt(15 / 3)
    assert p == pytest.approx(1 - 2 / math.pi * (x / (1 + x * x) + math.atan(x)))
    assert 0.02 < p < 0.04  # worse, but four days say little


@pytest.mark.parametrize("horizon", [1, 3])
def test_dm_matches_the_formula_written_out(horizon):
    rng = np.random.default_rng(1)
    actual = rng.normal(10, 1, (40, horizon))
    model, base = actual + rng.normal(0, 1.0, actual.shape), actual + rng.normal(0, 1.1, actual.shape)
    # with H > 1 a window's loss is its mean squared error over its H steps
    d = np.mean((model - actual) ** 2 - (base - actual) ** 2, axis=1)
    expected = dm_by_hand(list(d), horizon)
    assert diebold_mariano(model, base, actual) == pytest.approx(expected, rel=1e-9)
    assert diebold_mariano(base, model, actual) == pytest.approx((-expected[0], expected[1]), rel=1e-9)


def test_dm_clearly_better_model_and_identical_forecasts():
    rng = np.random.default_rng(2)
    actual = rng.normal(10, 1, (200, 1))
    good, bad = actual + rng.normal(0, 0.5, actual.shape), actual + rng.normal(0, 1.0, actual.shape)
    stat, p = diebold_mariano(good, bad, actual)
    assert stat < -5 and p < 0.01
    assert diebold_mariano(good, good.copy(), actual) == (0.0, 1.0)  # no division by zero
    assert diebold_mariano(good[:1], bad[:1], actual[:1]) == (0.0, 1.0)  # one forecast: no evidence


def test_dm_every_difference_equal_is_certain_not_a_division_by_zero():
    actual = np.zeros((5, 1))
    stat, p = diebold_mariano(actual + 2, actual + 1, actual)  # worse by 3 every day
    assert stat == math.inf and p == 0.0


def test_binomial_p_against_a_hand_value_and_scipy():
    last = np.full(10, 100.0)
    actual = np.array([101, 101, 101, 101, 101, 99, 99, 99, 99, 99.0])[:, None]  # always up: 5/10
    forecast = np.array([101, 101, 101, 101, 101, 99, 99, 99, 99, 101.0])[:, None]  # 9 of 10 right
    assert always_up(actual, last) == 0.5
    # two-sided, p0 = 1/2: P(X >= 9) + P(X <= 1) = 2 * (10 + 1) / 1024
    assert direction_p(forecast, actual, last) == pytest.approx(22 / 1024)
    rng = np.random.default_rng(3)
    last = rng.uniform(90, 110, 300)
    actual = last[:, None] * np.exp(rng.normal(0.002, 0.02, (300, 1)))
    forecast = last[:, None] * np.exp(rng.normal(0.001, 0.02, (300, 1)))
    hits = int(np.sum((forecast[:, 0] > last) == (actual[:, 0] > last)))
    up = always_up(actual, last)
    assert 0.5 < up < 0.6
    assert direction_p(forecast, actual, last) == pytest.approx(stats.binomtest(hits, 300, up).pvalue)


def test_binomial_uses_the_first_step_with_horizon_above_one():
    last = np.full(10, 100.0)
    first = np.array([101, 101, 101, 101, 101, 99, 99, 99, 99, 99.0])
    actual = np.stack([first, np.full(10, 50.0)], axis=1)  # step 2 always down, the model says up
    forecast = np.stack([np.where(np.arange(10) < 9, first, 101.0), np.full(10, 101.0)], axis=1)
    assert direction_p(forecast, actual, last) == pytest.approx(22 / 1024)


def planted(n: int, mu: float, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(last closes [N], next closes [N, 1]) of a random walk with drift `mu` a day."""
    closes = 50 * np.exp(np.cumsum(np.random.default_rng(seed).normal(mu, sigma, n + 1)))
    return closes[:-1], closes[1:, None]


def record(forecast: np.ndarray, actual: np.ndarray, last: np.ndarray, drift: float) -> dict:
    dates = pd.bdate_range("2022-01-03", periods=len(last))
    return compare(forecast, actual, last, dates, "TEST.SA", drift=drift)


def test_drift_baseline_is_the_training_mean_not_the_evaluated_splits():
    train_mu = 0.004  # planted in "training"; the evaluated days fall at 0.004 a day instead
    last, actual = planted(300, -0.004, 0.001, seed=4)
    expected = last[:, None] * np.exp(train_mu)
    np.testing.assert_allclose(drift_forecast(last, 1, train_mu), expected)
    np.testing.assert_allclose(drift_forecast(last, 3, train_mu)[:, 2], last * np.exp(3 * train_mu))
    m = record(persistence_forecast(last, 1), actual, last, drift=train_mu)
    assert m["drift_mean_log_return"] == train_mu
    # the split fell 0.4% a day: the training drift's +0.4% misses by ~2x persistence's error
    assert m["drift"]["rmse"] == pytest.approx(np.sqrt(np.mean((expected - actual) ** 2)))
    assert m["rmse_ratio_drift"] < 0.6 and m["dm_p_drift"] < 0.01
    assert "better than the random walk with drift" in table(m)


def test_a_model_that_finds_a_planted_drift_beats_persistence_but_not_drift():
    mu = 0.003
    last, actual = planted(250, mu, 0.002, seed=5)
    m = record(drift_forecast(last, 1, mu), actual, last, drift=mu)
    assert m["rmse_ratio"] < 0.9 and m["dm_stat_persistence"] < 0 and m["dm_p_persistence"] < 0.01
    assert (m["rmse_ratio_drift"], m["dm_stat_drift"], m["dm_p_drift"]) == (1.0, 0.0, 1.0)
    text = table(m)
    assert "better than tomorrow = today (DM p = " in text
    assert "no significant difference from the random walk with drift (DM p = 1.00)" in text


def test_verdict_three_ways():
    last, actual = planted(300, 0.0, 0.02, seed=6)
    rng = np.random.default_rng(7)
    move = actual - last[:, None]
    better = last[:, None] + 0.5 * move  # catches half of every move
    worse = last[:, None] - 0.5 * move
    # slightly better on average, far from significant: what PETR4's 0.9965 looked like
    noisy = last[:, None] + 0.02 * move + rng.normal(0, 0.004, actual.shape) * last[:, None]
    m = record(better, actual, last, drift=0.0)
    assert "better than tomorrow = today (DM p = " in table(m) and m["dm_p_persistence"] < 0.05
    m = record(worse, actual, last, drift=0.0)
    assert "worse than tomorrow = today (DM p = " in table(m) and m["dm_p_persistence"] < 0.05
    m = record(noisy, actual, last, drift=0.0)
    assert m["rmse_ratio"] < 1 and m["dm_p_persistence"] > 0.05
    assert (f"no significant difference from tomorrow = today (DM p = {m['dm_p_persistence']:.2f})"
            in table(m))
    assert "better than tomorrow" not in table(m)


def test_table_shows_drift_and_direction_against_always_up():
    last, actual = planted(200, 0.001, 0.02, seed=8)
    m = record(drift_forecast(last, 1, 0.001) * 1.001, actual, last, drift=0.001)
    lines = table(m).splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["test", "model", "persistence", "drift", "always"]
    assert lines[3].split()[1:3] == [f"{m['drift']['mae']:.4f}", f"{m['drift']['rmse']:.4f}"]
    # a model that always says "up" scores exactly the always-up share: no difference
    assert m["model"]["directional_accuracy"] == m["always_up"] and m["direction_p"] == 1.0
    assert (f"dir.acc {m['always_up']:.3f} vs always up {m['always_up']:.3f}: no significant "
            "difference from always up (binomial p = 1.00)") in lines


# ---- intervals ----

def test_ewma_sigma_is_the_riskmetrics_recursion():
    r = np.array([[0.01, -0.02, 0.03]])
    var = np.mean(r**2)
    for x in r[0]:
        var = 0.94 * var + 0.06 * x**2
    assert ewma_sigma(r)[0] == pytest.approx(np.sqrt(var), rel=1e-12)


def test_interval_score_and_pinball_by_hand():
    # one window, last close 100, actual 103; quantiles 95, 98, 100, 102, 104 (levels LEVELS)
    q = np.array([[[95.0, 98.0, 100.0, 102.0, 104.0]]])
    out = interval_scores(q, np.array([[103.0]]), np.array([100.0]))
    assert out["covered_80"][0] == 0 and out["covered_95"][0] == 1
    assert out["width_80"][0] == pytest.approx(4.0) and out["width_95"][0] == pytest.approx(9.0)
    assert out["score_80"][0] == pytest.approx(4.0 + 2 / 0.2 * 1.0)  # 1 point above the 90% quantile
    assert out["score_95"][0] == pytest.approx(9.0)
    misses = 103 - q[0, 0]
    tau = np.array(LEVELS)
    assert out["pinball"][0] == pytest.approx(np.mean(np.maximum(tau * misses, (tau - 1) * misses)))


def test_ewma_intervals_cover_at_their_nominal_rate_on_a_series_with_known_volatility():
    # returns with volatility that switches between 1% and 3% every 250 days: EWMA adapts
    rng = np.random.default_rng(0)
    sigma = np.where((np.arange(6000) // 250) % 2 == 0, 0.01, 0.03)
    close = 30 * np.exp(np.cumsum(rng.normal(0, sigma)))
    window = 60
    idx = np.arange(window, len(close))
    returns = np.diff(np.log(close))[idx[:, None] - window + np.arange(window - 1)]
    last, actual = close[idx - 1], close[idx][:, None]
    record = compare_intervals({"ewma": ewma_quantiles(last, returns, 1),
                                "historical": historical_quantiles(last, returns, 1)}, actual, last)
    assert record["ewma"]["coverage_80"] == pytest.approx(0.80, abs=0.02)
    assert record["ewma"]["coverage_95"] == pytest.approx(0.95, abs=0.015)
    assert record["historical"]["score_95_ratio_ewma"] > 1.0  # slower to adapt to the switches
    assert "score_95_ratio_ewma" not in record["ewma"]


def test_a_method_identical_to_the_reference_has_ratio_one_and_no_significant_difference():
    rng = np.random.default_rng(1)
    last = 30 * np.exp(rng.normal(0, 0.1, 300))
    returns = rng.normal(0, 0.02, (300, 59))
    actual = last[:, None] * np.exp(rng.normal(0, 0.02, (300, 2)))
    q = ewma_quantiles(last, returns, 2)
    record = compare_intervals({"ewma": q, "model": q.copy()}, actual, last)
    assert record["model"]["score_80_ratio_ewma"] == 1.0 and record["model"]["score_80_dm_p_ewma"] == 1.0
    # horizon 2: the 2-step interval is sqrt(2) wider than the 1-step one
    assert q[:, 1, 4] / q[:, 0, 4] == pytest.approx(np.exp(stats.norm.ppf(0.975) * ewma_sigma(returns)
                                                           * (np.sqrt(2) - 1)))


def test_dm_test_on_losses_matches_diebold_mariano_on_squared_errors():
    rng = np.random.default_rng(2)
    actual, a, b = rng.normal(size=(3, 200, 1))
    assert dm_test(((a - actual) ** 2)[:, 0], ((b - actual) ** 2)[:, 0]) == diebold_mariano(a, b, actual)
