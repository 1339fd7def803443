"""train(cfg) = fit (best val checkpoint) + evaluate (val and test against the baselines) + export;
the pieces are shared with the walk-forward backtest."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from sklearn.preprocessing import StandardScaler

from stockcast.data import FEATURES, StockDataModule, Windows, to_prices
from stockcast.evaluation import compare, plot, table
from stockcast.export import export_model, publish, sha256
from stockcast.model import LSTMForecaster, LSTMNet
from stockcast.prices import DataError, ticker_name

log = logging.getLogger(__name__)
# `import lightning` gives its logger a console handler of its own; Hydra's root handler would
# print every Lightning line a second time
logging.getLogger("lightning").propagate = False
# train.yaml's `name: ${ticker_name:${data.ticker}}`: artifacts/<name> follows the ticker unless set
OmegaConf.register_new_resolver("ticker_name", ticker_name, replace=True)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,63}")  # a folder name under artifacts/


class RunError(RuntimeError):
    """A run that cannot go on or must not publish; train.py prints it as one `error:` line."""


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())  # Hydra's and OmegaConf's messages span several lines
    if isinstance(err, ValueError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def build(cfg: DictConfig, key: str, **kwargs):
    """instantiate(cfg.<key>); a failure becomes its cause in one line, not Hydra's wrapper."""
    try:
        return instantiate(OmegaConf.select(cfg, key, throw_on_missing=True), **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise RunError(f"{key}: {one_line(err.__cause__ or err)}") from err
    except OmegaConfBaseException as err:  # a missing value or a broken ${...} interpolation
        raise RunError(f"{key}: {one_line(err)}") from err


def relative(path: str | Path, base: str | Path) -> str:
    """`path` relative to `base` for meta.json, or its name alone when outside `base`: an
    absolute path says nothing on the machine that serves the model."""
    path, base = Path(path).resolve(), Path(base).resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes to tracked files?) of the checkout at `root`; (None, None) outside one."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


@torch.no_grad()
def predict(net: LSTMNet, windows: Windows, scaler: StandardScaler) -> np.ndarray:
    """[N, H] forecast closes for a split's windows, in price units."""
    net.eval()
    scaled = net(torch.from_numpy(windows.inputs)).numpy().astype(np.float64)  # [N, H]
    returns = scaled * scaler.scale_[0] + scaler.mean_[0]
    return to_prices(windows.last_close, returns)


class NoCheckpoint(RunError):
    """fit() ended without a val-best checkpoint (max_epochs=0, fast_dev_run, interrupted)."""


def run_name(cfg: DictConfig) -> str:
    """cfg.name, checked to be a plain folder name: it names artifacts/<name>."""
    try:
        name = str(cfg.name)
    except OmegaConfBaseException as err:  # e.g. ${ticker_name:${data.ticker}} without a ticker
        raise RunError(f"name: {one_line(err)}") from err
    if not NAME.fullmatch(name):
        raise RunError(f"name {name!r} must be a plain folder name (letters, digits, . _ = -), "
                       "it names artifacts/<name>")
    return name


def load_data(cfg: DictConfig) -> StockDataModule:
    """cfg.data built, downloaded (or the snapshot found) and split into windows."""
    datamodule: StockDataModule = build(cfg, "data")
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def fit(cfg: DictConfig, datamodule: StockDataModule) -> tuple[LSTMForecaster, str]:
    """Train cfg.model on the datamodule's train split with early stopping on its val split;
    return the val-best checkpoint's model and that checkpoint's path (under cfg.paths.output_dir)."""
    L.seed_everything(cfg.seed, workers=True)  # after the data (which draws no random numbers)
    forecaster = build(cfg, "model")
    callbacks = [build(cfg, f"callbacks.{key}") for key in cfg.get("callbacks") or {}]
    loggers = [build(cfg, f"logger.{key}") for key in cfg.get("logger") or {}] or False
    # a progress bar redraws in place on a terminal; piped, every redraw stays (~70 KB per run)
    bar = cfg.trainer.get("enable_progress_bar")
    trainer: L.Trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers,
                               default_root_dir=str(cfg.paths.output_dir),
                               enable_progress_bar=sys.stdout.isatty() if bar is None else bar)
    trainer.fit(forecaster, datamodule=datamodule)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best or trainer.interrupted:
        # evaluating the untrained network would report persistence plus drift as a result
        how = "fast_dev_run, " if trainer.fast_dev_run else "interrupted, " if trainer.interrupted else ""
        raise NoCheckpoint(f"the run saved no checkpoint ({how}epochs: {trainer.current_epoch}, "
                           f"steps: {trainer.global_step})")
    # the val-best epoch, not the last one, is what gets evaluated and exported
    return type(forecaster).load_from_checkpoint(best, map_location="cpu"), best


def evaluate(forecaster: LSTMForecaster, datamodule: StockDataModule,
             splits: tuple[str, ...] = ("val", "test")) -> tuple[dict, dict]:
    """({split: [N, H] forecast closes}, {split: compare() record}) for the named splits."""
    windows, scaler, ticker = datamodule.splits, datamodule.scaler, datamodule.hparams.ticker
    forecasts = {s: predict(forecaster.net, windows[s], scaler) for s in splits}
    # the drift baseline's mean daily log return: the scaler's, fitted on the training period only
    results = {s: compare(f, windows[s].future, windows[s].last_close, windows[s].dates, ticker, split=s,
                          drift=float(scaler.mean_[0]))
               for s, f in forecasts.items()}
    return forecasts, results


def export(cfg: DictConfig, name: str, datamodule: StockDataModule, forecaster: LSTMForecaster,
           checkpoint: str, forecasts: dict, results: dict, data_sha256: str) -> Path:
    """Write model, scaler, meta, metrics.json and forecast.png to the run folder and publish them
    whole as artifacts/<name>; return that folder."""
    output_dir = Path(cfg.paths.output_dir)
    artifacts = Path(cfg.paths.artifacts_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    staging = artifacts / f".{name}.tmp-{os.getpid()}"  # built aside, then swapped in whole
    shutil.rmtree(staging, ignore_errors=True)
    hp, splits = datamodule.hparams, datamodule.splits
    root = Path(cfg.paths.root)
    commit, dirty = git_state(root)
    target_dates = {s: [f"{w.dates[0]:%Y-%m-%d}", f"{w.dates[-1]:%Y-%m-%d}"] for s, w in splits.items()}
    try:
        export_model(forecaster.net, staging, datamodule.scaler, FEATURES, meta={
            "name": name, "ticker": hp.ticker, "window": hp.window, "horizon": hp.horizon,
            # paths relative to the project root (paths.root); the checkpoint relative to run_dir
            "data": {"file": relative(datamodule.path, root), "sha256": data_sha256,
                     "start": hp.start, "end": hp.end, "target_dates": target_dates},
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": commit,
            "git_dirty": dirty,
            "seed": cfg.seed,
            "run_dir": relative(output_dir, root),
            "checkpoint": relative(checkpoint, output_dir),
            "metrics": results,
            "config": OmegaConf.to_container(cfg.model, resolve=True),
        })
        (staging / "metrics.json").write_text(json.dumps(results["test"], indent=2))
        t = splits["test"]
        plot(staging / "forecast.png", t.dates, t.future, forecasts["test"], t.last_close,
             results["test"])
        shutil.copytree(staging, output_dir / "artifacts", dirs_exist_ok=True)
        publish(staging, artifacts / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after publish; a leftover after a failure
    return artifacts / name


def train(cfg: DictConfig) -> dict:
    """Run one experiment: fit, evaluate, export; return {"test": metrics.json record, "val": the
    same on val}."""
    name = run_name(cfg)
    datamodule = load_data(cfg)
    data_sha256 = sha256(datamodule.path)  # of the file as it was read, not as it may be later
    try:
        forecaster, checkpoint = fit(cfg, datamodule)
    except NoCheckpoint as err:
        raise RunError(f"{err}: nothing to evaluate or publish, "
                       f"{Path(cfg.paths.artifacts_dir) / name} is left as it was") from None
    forecasts, results = evaluate(forecaster, datamodule)
    published = export(cfg, name, datamodule, forecaster, checkpoint, forecasts, results, data_sha256)

    # logged, not printed: Hydra writes these to the console and to <run folder>/train.log
    log.info(table(results["test"]))
    log.info(f"val rmse_ratio {results['val']['rmse_ratio']:.4f} (the split used for choices)")
    log.info(f"artifacts: {published}  (run folder: {cfg.paths.output_dir})")
    return results
