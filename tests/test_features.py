"""The transform between prices and the network (features.py), which the archive ships."""

from __future__ import annotations

import numpy as np
import pytest

from stockcast.features import (
    FEATURES,
    RANGE_FEATURES,
    day_features,
    input_returns,
    log_returns,
    scale_features,
    to_inputs,
    to_prices,
)


def test_inputs_are_standardised_log_returns():
    closes = np.array([[10.0, 11.0, 9.9, 10.89]])
    x = to_inputs(closes, mean=0.01, scale=0.1)
    assert x.shape == (1, 3, len(FEATURES)) and x.dtype == np.float32
    expected = (np.log([1.1, 0.9, 1.1]) - 0.01) / 0.1
    np.testing.assert_allclose(x[0, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(input_returns(x, 0.01, 0.1)[0], np.log([1.1, 0.9, 1.1]), rtol=1e-6)


def test_prices_compound_the_unstandardised_outputs_from_the_last_close():
    out = to_prices(np.array([10.0, 20.0]), np.array([[1.0, -1.0], [0.0, 0.0]]), mean=0.01, scale=0.1)
    np.testing.assert_allclose(out[0], [10 * np.exp(0.11), 10 * np.exp(0.11 - 0.09)])
    np.testing.assert_allclose(out[1], [20 * np.exp(0.01), 20 * np.exp(0.02)])


@pytest.mark.parametrize("k", [0.01, 3.0, 1000.0])
def test_the_transform_is_scale_equivariant(k):
    closes = 30 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.02, (4, 60)), axis=1))
    np.testing.assert_allclose(to_inputs(k * closes, 0.001, 0.02), to_inputs(closes, 0.001, 0.02), atol=1e-5)
    outputs = np.random.default_rng(1).normal(size=(4, 3))
    np.testing.assert_allclose(to_prices(k * closes[:, -1], outputs, 0.001, 0.02),
                               k * to_prices(closes[:, -1], outputs, 0.001, 0.02), rtol=1e-12)


def test_an_overflowing_forecast_is_inf_not_an_error():
    assert np.isinf(to_prices(np.array([1e300]), np.array([[1e3]]), 0.0, 1.0)).all()
    assert log_returns(np.array([1.0, np.e])) == pytest.approx([1.0])


def test_range_features_are_the_days_log_range_and_whether_it_is_known():
    closes = np.array([[10.0, 11.0, 9.9, 10.89]])
    high = np.array([[10.5, 11.5, np.nan, 11.0]])
    low = np.array([[9.5, 10.5, 9.5, 10.0]])
    days = day_features(closes, high, low, n_features=3)  # [B, T-1, 3], each return's own day
    np.testing.assert_allclose(days[0, :, 0], np.log([1.1, 0.9, 1.1]))
    np.testing.assert_allclose(days[0, :, 1], [np.log(11.5 / 10.5), 0.0, np.log(1.1)])
    assert days[0, :, 2].tolist() == [1.0, 0.0, 1.0]
    x = scale_features(days, [0.01, 0.05, 0.0], [0.1, 0.02, 1.0])
    np.testing.assert_allclose(x[0, :, 1], [(np.log(11.5 / 10.5) - 0.05) / 0.02, 0.0, (np.log(1.1) - 0.05) / 0.02],
                               rtol=1e-6)  # an unknown range scales to 0, not to "a range of 0"
    # no high/low at all: the same as every day unknown; and each feature is scale-free
    np.testing.assert_array_equal(day_features(closes, None, None, 3)[..., 1:], 0.0)
    np.testing.assert_allclose(day_features(7 * closes, 7 * high, 7 * low, 3), days, atol=1e-12)
    assert to_inputs(closes, [0.01, 0.05, 0.0], [0.1, 0.02, 1.0], high, low).shape == (1, 3, len(RANGE_FEATURES))
