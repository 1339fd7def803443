"""The transform between prices and the network (features.py), which the archive ships."""

from __future__ import annotations

import numpy as np
import pytest

from stockcast.features import FEATURES, input_returns, log_returns, to_inputs, to_prices


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
