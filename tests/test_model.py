"""The network's shapes, its persistence anchor and scale-equivariant forecasts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stockcast.data import Windows
from stockcast.features import log_returns
from stockcast.model import LSTMForecaster, LSTMNet
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
    forecast = predict(LSTMNet(horizon=3), windows_for(history), FittedScaler())
    drift = np.exp(FittedScaler.mean_[0] * np.arange(1, 4))
    np.testing.assert_allclose(forecast, history[:, -1:] * drift, rtol=1e-6)


@pytest.mark.parametrize("k", [0.01, 3, 100])
def test_forecast_scales_with_its_input(k):
    torch.manual_seed(0)
    net = LSTMNet(horizon=5)
    torch.nn.init.normal_(net.head.weight, std=0.5)  # a model that really moves the forecast
    history = 20 * np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.02, (8, 60)), axis=1))
    base = predict(net, windows_for(history), FittedScaler())
    assert not np.allclose(base, history[:, -1:], rtol=1e-3)
    np.testing.assert_allclose(predict(net, windows_for(k * history), FittedScaler()), k * base,
                               rtol=1e-5)


def test_an_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="loss must be huber or mse, not 'mae'"):
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
