"""The network's shapes, its persistence and EWMA anchors, non-crossing quantiles, the pinball loss
and scale-equivariant forecasts and quantiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stockcast.data import Windows
from stockcast.features import log_returns
from stockcast.evaluation import LEVELS, ewma_quantiles
from stockcast.model import LSTMForecaster, LSTMNet, PinballLoss
from stockcast.training import predict


class FittedScaler:
    mean_ = np.array([0.0004])
    scale_ = np.array([0.025])


def windows_for(history: np.ndarray) -> Windows:
    """[B, T] closes -> the model inputs the data module would build for them."""
    x = (log_returns(history) - FittedScaler.mean_[0]) / FittedScaler.scale_[0]
    return Windows(x[..., None].astype(np.float32), None, history[:, -1], None, None)


@pytest.mark.parametrize("horizon", [1, 5])
def test_output_shapes(horizon):
    net = LSTMNet(input_size=1, hidden_size=16, num_layers=2, horizon=horizon)
    assert net(torch.randn(7, 59, 1)).shape == (7, horizon)
    assert LSTMForecaster(horizon=horizon)(torch.randn(3, 59, 1)).shape == (3, horizon)


def test_untrained_model_forecasts_persistence_plus_training_drift():
    history = np.random.default_rng(0).uniform(10, 20, (4, 60))
    forecast, quantiles = predict(LSTMNet(horizon=3), windows_for(history), FittedScaler())
    assert quantiles is None  # a point network
    drift = np.exp(FittedScaler.mean_[0] * np.arange(1, 4))
    np.testing.assert_allclose(forecast, history[:, -1:] * drift, rtol=1e-6)


@pytest.mark.parametrize("k", [0.01, 3, 100])
def test_forecast_scales_with_its_input(k):
    torch.manual_seed(0)
    net = LSTMNet(horizon=5)
    torch.nn.init.normal_(net.head.weight, std=0.5)  # a model that really moves the forecast
    history = 20 * np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.02, (8, 60)), axis=1))
    base = predict(net, windows_for(history), FittedScaler())[0]
    assert not np.allclose(base, history[:, -1:], rtol=1e-3)
    np.testing.assert_allclose(predict(net, windows_for(k * history), FittedScaler())[0], k * base,
                               rtol=1e-5)


def test_an_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="loss must be huber, mse or pinball, not 'mae'"):
        LSTMForecaster(loss="mae")
    assert isinstance(LSTMForecaster(loss="mse").loss, torch.nn.MSELoss)


def test_dropout_acts_on_the_last_hidden_state_even_with_one_layer():
    # nn.LSTM applies dropout only between layers: with one layer model.dropout used to do nothing
    torch.manual_seed(0)
    net = LSTMNet(hidden_size=16, num_layers=1, dropout=0.5)
    torch.nn.init.normal_(net.head.weight, std=0.5)
    x = torch.randn(8, 59, 1)
    net.train()
    assert not torch.allclose(net(x), net(x))  # a fresh mask on every pass while training
    net.eval()
    assert torch.equal(net(x), net(x))  # and none when forecasting (and so in the exports)


def quantile_net(horizon: int = 1, **kwargs) -> LSTMNet:
    return LSTMNet(hidden_size=16, num_layers=1, horizon=horizon, levels=list(LEVELS), **kwargs)


@pytest.mark.parametrize("horizon", [1, 5])
def test_the_loss_decides_the_output_width(horizon):
    assert quantile_net(horizon)(torch.randn(7, 59, 1)).shape == (7, horizon, len(LEVELS))
    forecaster = LSTMForecaster(horizon=horizon, loss="pinball", levels=list(LEVELS))
    assert forecaster(torch.randn(3, 59, 1)).shape == (3, horizon, len(LEVELS))
    assert LSTMForecaster(horizon=horizon, loss="huber", levels=list(LEVELS)).net.levels == []


@pytest.mark.parametrize("levels, match", [([0.1, 0.9], "must hold 0.5"), ([0.5, 0.1], "increase"),
                                           ([0.0, 0.5], "increase"), ([0.1, 0.5, 0.8], "central pairs"),
                                           ([0.5], "central pairs")])
def test_bad_levels_are_a_clear_error(levels, match):
    with pytest.raises(ValueError, match=match):
        LSTMForecaster(loss="pinball", levels=levels)


class Unscaled:  # returns in the window are the network's inputs as they are
    mean_ = np.array([0.0])
    scale_ = np.array([1.0])


@pytest.mark.parametrize("horizon", [1, 3])
def test_untrained_quantile_model_is_the_ewma_baseline(horizon):
    history = 20 * np.exp(np.cumsum(np.random.default_rng(2).normal(0, 0.02, (6, 60)), axis=1))
    returns = log_returns(history)
    windows = Windows(returns[..., None].astype(np.float32), None, history[:, -1], None, None)
    point, quantiles = predict(quantile_net(horizon), windows, Unscaled())
    np.testing.assert_allclose(quantiles, ewma_quantiles(history[:, -1], returns, horizon), rtol=1e-5)
    np.testing.assert_allclose(point, np.repeat(history[:, -1:], horizon, axis=1), rtol=1e-6)


def test_uncalibrated_quantiles_are_ordered_before_any_rearranging():
    """The ladder of positive gaps orders them by construction: the sort after it is a no-op
    unless calibration factors cross them."""
    torch.manual_seed(4)
    net = quantile_net(horizon=3, anchor=False).eval()  # no dropout
    for p in net.parameters():
        torch.nn.init.normal_(p, std=3.0)
    x = torch.randn(64, 59, 1) * 5
    with torch.no_grad():
        out, _ = net.lstm(x)
        raw = net.head(out[:, -1]).reshape(-1, 3, 5)
        built = raw[..., 2:3] + torch.nn.functional.softplus(raw) @ net.ladder  # median + gaps, unsorted
    assert (built[..., 1:] >= built[..., :-1]).all()  # ties where a softplus underflows to 0
    torch.testing.assert_close(net(x), built)


def test_quantiles_never_cross_for_random_inputs_and_weights():
    torch.manual_seed(3)
    for trial in range(20):
        net = quantile_net(horizon=4, anchor=bool(trial % 2))
        for p in net.parameters():
            torch.nn.init.normal_(p, std=3.0)
        # calibration factors that would cross the 80% and 95% quantiles: rearranged, still ordered
        net.calibration.copy_(torch.tensor([3.0, 0.2, 1.0, 0.2, 3.0]).repeat(4, 1) if trial % 3 == 0
                              else torch.rand(4, 5) * 2)
        q = net(torch.randn(64, 59, 1) * 5)
        assert torch.isfinite(q).all()
        assert (q[..., 1:] >= q[..., :-1]).all()


def test_pinball_loss_against_hand_computed_values():
    # one window, horizon 2, levels 0.1/0.5/0.9; per-step targets 1 and 2: cumulative moves 1 and 3
    loss = PinballLoss([0.1, 0.5, 0.9])
    q = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 4.0, 5.0]]])
    # step 1: y=1 -> 0.1*(1-0)=0.1, 0, (0.9-1)*(1-2)=0.1 ; step 2: y=3 -> 0.1*1=0.1, 0.5*1=0.5, 0.1*2=0.2
    expected = (0.1 + 0.0 + 0.1 + 0.1 + 0.5 + 0.2) / 6
    assert loss(q, torch.tensor([[1.0, 2.0]])).item() == pytest.approx(expected)


@pytest.mark.parametrize("k", [0.01, 3, 100])
def test_quantiles_scale_with_the_input(k):
    torch.manual_seed(0)
    net = quantile_net(horizon=3)
    torch.nn.init.normal_(net.head.weight, std=0.5)
    history = 20 * np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.02, (8, 60)), axis=1))
    point, base = predict(net, windows_for(history), FittedScaler())
    scaled_point, scaled = predict(net, windows_for(k * history), FittedScaler())
    np.testing.assert_allclose(scaled, k * base, rtol=1e-5)
    np.testing.assert_allclose(scaled_point, k * point, rtol=1e-5)
