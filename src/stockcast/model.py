"""The network (`LSTMNet`, plain torch) and the training system around it (`LSTMForecaster`)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class LSTMNet(nn.Module):
    """[B, T, F] scaled log returns -> [B, H] scaled log returns of the next H closes (direct)."""

    def __init__(self, input_size: int = 1, hidden_size: int = 50, num_layers: int = 2,
                 dropout: float = 0.1, horizon: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        # on the last hidden state too: between layers alone, dropout did nothing with one layer
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, horizon)
        # start at "no change": an untrained or weak model forecasts about persistence (plus the
        # training drift), never the far-off prices an unanchored model extrapolates to
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # B batch, T window-1 returns, F features, D hidden_size, H horizon
        out, _ = self.lstm(x)  # [B, T, D]
        return self.head(self.drop(out[:, -1]))  # [B, H]


class LSTMForecaster(L.LightningModule):
    """Trains `LSTMNet` on scaled returns (Huber or MSE loss); scalar hyperparameters for checkpoints."""

    def __init__(self, input_size: int = 1, hidden_size: int = 50, num_layers: int = 2,
                 dropout: float = 0.1, horizon: int = 1, lr: float = 0.001,
                 weight_decay: float = 0.0, loss: str = "mse") -> None:
        super().__init__()
        losses = {"mse": nn.MSELoss, "huber": nn.HuberLoss}
        if loss not in losses:
            raise ValueError(f"loss must be huber or mse, not {loss!r}")
        self.save_hyperparameters()
        self.net = LSTMNet(input_size, hidden_size, num_layers, dropout, horizon)
        # huber: daily returns have fat tails (PETR4 -29.7% on 2020-03-09) that MSE chases
        self.loss = losses[loss]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)
