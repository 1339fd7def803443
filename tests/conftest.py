"""Shared fixtures: the real Hydra configs composed for fast offline runs, and tiny price files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import stockcast.training  # noqa: F401  registers ${ticker_name:}, which configs/train.yaml uses

ROOT = Path(__file__).resolve().parents[1]
# the gate wants a walk-forward backtest of the same config; tests of training and serving force
# past it (test_registry.py tests the gate itself)
FORCE = "gate.force=tests-of-training-and-serving"  # (and so no backtest run by the gate)
NO_BACKTEST = "gate.backtest=never"  # a refused run stays quick
QUICK = ["trainer.max_epochs=2", "+trainer.limit_train_batches=4", "~logger", FORCE]  # a few seconds


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Every MLflow run and registered version of the tests lands in a temporary store."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def compose_train(tmp_path: Path, *overrides: str) -> DictConfig:
    """configs/train.yaml as train.py sees it, writing only under `tmp_path`."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data.source=csv", f"paths.root={ROOT}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
        cfg.trainer.enable_progress_bar = False
    return cfg


def random_walk(n: int = 400, start: str = "2020-01-01", seed: int = 0) -> pd.DataFrame:
    """A business-day random walk of closes, like a real price series."""
    rng = np.random.default_rng(seed)
    close = 20 * np.exp(np.cumsum(rng.normal(0.0003, 0.02, n)))
    return pd.DataFrame({"close": close}, index=pd.bdate_range(start, periods=n, name="date"))


@pytest.fixture
def walk() -> pd.DataFrame:
    return random_walk()


def yfinance_frame(ticker: str, frame: pd.DataFrame) -> pd.DataFrame:
    """What yf.download(ticker) returns since 0.2.51: (Price, Ticker) MultiIndex columns."""
    c = frame["close"].to_numpy()
    data = {("Close", ticker): c, ("High", ticker): c * 1.01, ("Low", ticker): c * 0.99,
            ("Open", ticker): c, ("Volume", ticker): np.full(len(c), 1000)}
    out = pd.DataFrame(data, index=frame.index.rename("Date"))
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["Price", "Ticker"])
    return out


@pytest.fixture
def yahoo(monkeypatch):
    """yf.download faked: answers with `yahoo.frame` (None: yfinance's empty answer) and logs calls."""
    import yfinance as yf

    class Fake:
        frame, calls = None, []

        def download(self, tickers, **kwargs):
            self.calls.append((tickers, kwargs["start"], kwargs["end"]))
            return yfinance_frame(tickers, self.frame if self.frame is not None else random_walk(0))

    fake = Fake()
    monkeypatch.setattr(yf, "download", fake.download)
    return fake


def write_flat_csv(path: Path, frame: pd.DataFrame) -> Path:
    """The flat `Date,Open,High,Low,Close,Volume` shape."""
    out = pd.DataFrame({"Open": frame.close, "High": frame.close, "Low": frame.close,
                        "Close": frame.close, "Volume": 1000}, index=frame.index.rename("Date"))
    out.to_csv(path)
    return path


def outputs_from_export(folder: Path, history: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """([B] last closes, the network's outputs, meta.json, scaler.json) from model.pt alone."""
    meta = json.loads((folder / "meta.json").read_text())
    scaler = json.loads((folder / "scaler.json").read_text())
    model = torch.jit.load(str(folder / "model.pt"))
    closes = history[:, -meta["window"] :]
    x = (np.diff(np.log(closes), axis=1) - scaler["mean"][0]) / scaler["scale"][0]
    with torch.no_grad():
        y = model(torch.tensor(x[..., None], dtype=torch.float32)).double().numpy()
    return closes[:, -1], y, meta, scaler


def quantiles_from_export(folder: Path, history: np.ndarray) -> np.ndarray:
    """[B, H, Q] quantile closes of a quantile model: its outputs are standardised cumulative moves."""
    last, y, meta, scaler = outputs_from_export(folder, history)
    steps = np.arange(1, meta["horizon"] + 1)[None, :, None]
    return last[:, None, None] * np.exp(y * scaler["scale"][0] + scaler["mean"][0] * steps)


def forecast_from_export(folder: Path, history: np.ndarray) -> np.ndarray:
    """[B, >=window] closes -> [B, horizon] closes using only model.pt, scaler.json, meta.json:
    a point model's returns summed, or a quantile model's median."""
    last, y, meta, scaler = outputs_from_export(folder, history)
    if meta.get("levels"):
        return quantiles_from_export(folder, history)[..., meta["levels"].index(0.5)]
    return last[:, None] * np.exp(np.cumsum(y * scaler["scale"][0] + scaler["mean"][0], axis=1))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """A quickly trained petr4 export (model.pt, scaler.json, meta.json, ...)."""
    from stockcast.training import train

    tmp = tmp_path_factory.mktemp("trained")
    train(compose_train(tmp, "experiment=petr4", *QUICK))
    return tmp / "artifacts" / "petr4"


@pytest.fixture(scope="session")
def mar(artifacts, tmp_path_factory) -> Path:
    """model_store/lstm.mar built from `artifacts` the way `make package` builds it."""
    from stockcast.package import build_archive

    return build_archive(artifacts, tmp_path_factory.mktemp("model_store"), handlers=ROOT / "handlers")


def closes(n: int = 60, batch: int | None = None, seed: int = 0) -> np.ndarray:
    """Realistic closes: a random walk around 30 with 2% daily moves."""
    shape = (n,) if batch is None else (batch, n)
    steps = np.random.default_rng(seed).normal(0, 0.02, shape)
    return 30 * np.exp(np.cumsum(steps, axis=-1))


@pytest.fixture(scope="module")
def server(mar, tmp_path_factory):
    """A real TorchServe (Java frontend, Python workers) on free ports, serving `mar`."""
    from stockcast.serve import free_ports, start, stop

    home = tmp_path_factory.mktemp("torchserve")
    srv = start(mar.parent, home, handlers=ROOT / "handlers", ports=free_ports())
    try:
        yield srv
    finally:
        stop(srv)
