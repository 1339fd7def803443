"""The network (`LSTMNet`, plain torch) and the training system around it (`LSTMForecaster`).

With quantile `levels` the network forecasts the distribution of the cumulative move to each
horizon step: quantiles in units of the window's RiskMetrics EWMA volatility, so an untrained
network gives the EWMA baseline's normal quantiles and training learns where to depart from them.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

RISKMETRICS_LAMBDA = 0.94  # J.P. Morgan's RiskMetrics (1996) decay for daily returns


def check_levels(levels) -> list[float]:
    """Quantile levels as floats, strictly increasing in (0, 1) and holding the median (the point)."""
    out = [float(x) for x in levels]
    if not out or any(not 0 < x < 1 for x in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"model.levels must increase strictly within (0, 1), got {out}")
    if 0.5 not in out:
        raise ValueError(f"model.levels must hold 0.5 (the median is the point forecast), got {out}")
    mirrored = {round(x, 6) for x in out}
    if any(round(1 - x, 6) not in mirrored for x in out) or len(out) < 3:
        raise ValueError(f"model.levels must come in central pairs around 0.5 (0.1 with 0.9: the "
                         f"intervals served and scored), got {out}")
    return out


class LSTMNet(nn.Module):
    """[B, T, F] scaled log returns -> [B, H] scaled log returns of the next H closes (direct), or
    with `levels`: [B, H, Q] quantiles of the scaled cumulative log return to each step."""

    def __init__(self, input_size: int = 1, hidden_size: int = 50, num_layers: int = 2,
                 dropout: float = 0.1, horizon: int = 1, levels: list[float] | None = None,
                 anchor: bool = True) -> None:
        super().__init__()
        self.levels = check_levels(levels) if levels else []
        self.horizon, self.quantiles, self.anchor = horizon, len(self.levels) or 1, anchor
        self.has_levels = bool(self.levels)  # TorchScript: no truth value of a list
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        # on the last hidden state too: between layers alone, dropout did nothing with one layer
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, horizon * self.quantiles)
        # start at "no change": an untrained or weak model forecasts about persistence (plus the
        # training drift), never the far-off prices an unanchored model extrapolates to
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        q, m = self.quantiles, self.levels.index(0.5) if self.levels else 0
        # quantile k = median + sum of positive gaps out to it: they never cross. ladder[j, k] is
        # +1 for the gaps j above the median up to k, -1 for those below it down to k
        ladder = torch.zeros(q, q)
        for k in range(q):
            ladder[m + 1 : k + 1, k] = 1.0
            ladder[k:m, k] = -1.0
        self.register_buffer("ladder", ladder)
        self.register_buffer("median_mask", F.one_hot(torch.tensor(m), q).float())
        # conformal calibration (calibration.py): each quantile's distance from the median times this
        self.register_buffer("calibration", torch.ones(horizon, q))
        self.register_buffer("sqrt_h", torch.arange(1, horizon + 1).float().sqrt()[:, None])  # [H, 1]
        if self.levels:  # gaps of the standard normal's quantiles: untrained = EWMA's intervals
            z = [NormalDist().inv_cdf(x) for x in self.levels]
            gaps = [z[j] - z[j - 1] if j > m else z[j + 1] - z[j] if j < m else 0.0 for j in range(q)]
            with torch.no_grad():  # softplus(b) = gap
                self.head.bias.copy_(torch.tensor([0.0 if j == m else math.log(math.expm1(g))
                                                   for j, g in enumerate(gaps)] * horizon))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # B batch, T window-1 returns, F features, D hidden_size, H horizon, Q levels
        out, _ = self.lstm(x)  # [B, T, D]
        y = self.head(self.drop(out[:, -1]))  # [B, H * Q]
        if not self.has_levels:
            return y  # [B, H]
        raw = y.reshape(-1, self.horizon, self.quantiles)  # [B, H, Q]
        median = (raw * self.median_mask).sum(-1, keepdim=True)  # [B, H, 1]
        offsets = F.softplus(raw) @ self.ladder  # [B, H, Q], 0 at the median, increasing
        q = median + offsets * self.calibration
        q = torch.sort(q, dim=-1).values  # a calibration that crossed them is rearranged
        if self.anchor:
            q = q * (ewma_sigma(x[..., 0])[:, None, None] * self.sqrt_h)  # cumulative move: sigma sqrt(h)
        return q


def ewma_sigma(returns: torch.Tensor, lam: float = RISKMETRICS_LAMBDA) -> torch.Tensor:
    """[B, T] returns -> [B] RiskMetrics volatility forecast, as evaluation.ewma_sigma (started at the
    window's mean square), written as one weighted sum so that it exports to ONNX."""
    t = returns.shape[1]
    power = torch.arange(t - 1, -1, -1, dtype=returns.dtype, device=returns.device)
    weights = (1 - lam) * torch.pow(torch.full_like(power, lam), power) + lam**t / t  # [T]
    # a floor, not an offset: a flat window (no move in 59 days) still gets a positive width
    return torch.sqrt((returns**2 * weights).sum(-1).clamp_min(1e-12))


class PinballLoss(nn.Module):
    """Mean quantile (pinball) loss of [B, H, Q] quantiles of the cumulative move against [B, H]
    per-step targets (the quantiles of a sum are not the sums of quantiles)."""

    def __init__(self, levels: list[float]) -> None:
        super().__init__()
        self.register_buffer("tau", torch.tensor(levels))

    def forward(self, quantiles: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        miss = targets.cumsum(dim=1)[..., None] - quantiles  # [B, H, Q]
        return torch.maximum(self.tau * miss, (self.tau - 1) * miss).mean()


class LSTMForecaster(L.LightningModule):
    """Trains `LSTMNet` on scaled returns: Huber or MSE for a point forecast, pinball for quantiles
    (the loss decides the output width); scalar hyperparameters for checkpoints."""

    def __init__(self, input_size: int = 1, hidden_size: int = 50, num_layers: int = 2,
                 dropout: float = 0.1, horizon: int = 1, lr: float = 0.001,
                 weight_decay: float = 0.0, loss: str = "mse", levels: list[float] | None = None,
                 anchor: bool = True, calibrate: bool = False, range_dropout: float = 0.0) -> None:
        super().__init__()
        if loss not in ("mse", "huber", "pinball"):
            raise ValueError(f"model.loss must be huber, mse or pinball, not {loss!r}")
        levels = check_levels(levels) if loss == "pinball" else None
        self.save_hyperparameters()
        self.net = LSTMNet(input_size, hidden_size, num_layers, dropout, horizon, levels, anchor)
        # huber: daily returns have fat tails (PETR4 -29.7% on 2020-03-09) that MSE chases
        self.loss = {"mse": nn.MSELoss, "huber": nn.HuberLoss}[loss]() if levels is None else PinballLoss(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        # sync_dist: under DDP each process sees a share of the windows; early stopping and the
        # checkpoint must judge the mean over all of them (a no-op in one process)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(x),
                 sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.hparams.range_dropout and x.shape[-1] > 1:  # inputs with each day's range (and has_range)
            # some windows without their ranges, as a request of closes alone arrives
            keep = (torch.rand(len(x), 1, 1, device=x.device) >= self.hparams.range_dropout).to(x.dtype)
            x = torch.cat([x[..., :1], x[..., 1:] * keep], dim=-1)
        return self._step((x, y), "train")

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)
