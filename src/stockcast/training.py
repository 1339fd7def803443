"""train(cfg): fit, pick the best val checkpoint, compare with persistence on test, export."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sklearn.preprocessing import StandardScaler

from stockcast.data import FEATURES, StockDataModule, Windows, to_prices
from stockcast.evaluation import compare, plot, table
from stockcast.export import export_model, publish
from stockcast.model import LSTMForecaster, LSTMNet

# `import lightning` gives its logger a console handler of its own; Hydra's root handler would
# print every Lightning line a second time
logging.getLogger("lightning").propagate = False


@torch.no_grad()
def predict(net: LSTMNet, windows: Windows, scaler: StandardScaler) -> np.ndarray:
    """[N, H] forecast closes for a split's windows, in price units."""
    net.eval()
    scaled = net(torch.from_numpy(windows.inputs)).numpy().astype(np.float64)  # [N, H]
    returns = scaled * scaler.scale_[0] + scaler.mean_[0]
    return to_prices(windows.last_close, returns)


def train(cfg: DictConfig) -> dict:
    """Run one experiment; return {"test": metrics.json record, "val": the same on val}."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule: StockDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    forecaster: LSTMForecaster = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()] or False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                                     default_root_dir=str(output_dir))
    trainer.fit(forecaster, datamodule=datamodule)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:  # the val-best epoch, not the last one, is what gets evaluated and exported
        forecaster = LSTMForecaster.load_from_checkpoint(best, map_location="cpu")
    splits, scaler, ticker = datamodule.splits, datamodule.scaler, datamodule.hparams.ticker
    forecasts = {s: predict(forecaster.net, splits[s], scaler) for s in ("val", "test")}
    results = {s: compare(f, splits[s].future, splits[s].last_close, splits[s].dates, ticker)
               for s, f in forecasts.items()}

    artifacts = Path(cfg.paths.artifacts_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    staging = artifacts / f".{cfg.name}.tmp-{os.getpid()}"  # built aside, then swapped in whole
    shutil.rmtree(staging, ignore_errors=True)
    hp = datamodule.hparams
    target_dates = {s: [f"{w.dates[0]:%Y-%m-%d}", f"{w.dates[-1]:%Y-%m-%d}"] for s, w in splits.items()}
    try:
        export_model(forecaster.net, staging, scaler, FEATURES, meta={
            "name": cfg.name, "ticker": ticker, "window": hp.window, "horizon": hp.horizon,
            "data": {"file": str(datamodule.path), "start": hp.start, "end": hp.end,
                     "target_dates": target_dates},
            "checkpoint": best or None,
            "metrics": results,
            "config": OmegaConf.to_container(cfg.model, resolve=True),
        })
        (staging / "metrics.json").write_text(json.dumps(results["test"], indent=2))
        t = splits["test"]
        plot(staging / "forecast.png", t.dates, t.future, forecasts["test"], t.last_close,
             results["test"])
        shutil.copytree(staging, output_dir / "artifacts", dirs_exist_ok=True)
        publish(staging, artifacts / cfg.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after publish; a leftover after a failure

    print(table(results["test"]))
    print(f"val rmse_ratio {results['val']['rmse_ratio']:.4f} (the split used for choices)")
    print(f"artifacts: {artifacts / cfg.name}  (run folder: {output_dir})")
    return results
