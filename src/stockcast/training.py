"""train(cfg) = fit (best val checkpoint) + evaluate (val and test against the baselines) + refit on
all data + export, then promotion.publish_version (a registered version, the champion if the gate
passes); fit and evaluate are shared with the walk-forward backtest."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from sklearn.preprocessing import StandardScaler

from stockcast.data import StockDataModule, Windows
from stockcast.calibration import calibrate
from stockcast.evaluation import LEVELS, baseline_intervals, compare, compare_intervals, interval_table, plot, table
from stockcast.export import export_model, sha256
from stockcast.features import input_returns, to_forecasts
from stockcast.launch import is_global_zero, launched_externally, world_size
from stockcast.model import LSTMForecaster, LSTMNet
from stockcast.prices import DataError, load_prices, ticker_name
from stockcast.tracking import Run

log = logging.getLogger(__name__)
# `import lightning` gives its logger a console handler of its own; Hydra's root handler would
# print every Lightning line a second time
logging.getLogger("lightning").propagate = False
# train.yaml's `name: ${ticker_name:${data.ticker}}`: artifacts/<name> follows the ticker unless set
OmegaConf.register_new_resolver("ticker_name", ticker_name, replace=True)
OmegaConf.register_new_resolver("len", len, replace=True)  # model.input_size: ${len:${data.features}}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,63}")  # a folder name under artifacts/


class RunError(RuntimeError):
    """A run that cannot go on or must not publish; train.py prints it as one `error:` line."""


def run_or_exit(step, cfg: DictConfig):
    """step(cfg) for train.py and backtest.py: the user's errors (a file, the config, the MLflow
    store) become one `error:` line and exit code 2, never a traceback."""
    try:
        return step(cfg)
    except (DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
    except Exception as err:
        if type(err).__name__ != "MlflowException":  # mlflow is imported only where it is used
            raise
        from stockcast.tracking import tracking_uri

        print(f"error: MLflow store {tracking_uri(cfg.paths.root)}: {' '.join(str(err).split())[:300]}",
              file=sys.stderr)
    sys.exit(2)


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
def predict(net: LSTMNet, windows: Windows, scaler: StandardScaler) -> tuple[np.ndarray, np.ndarray | None]:
    """A split's forecasts in price units: ([N, H] closes, [N, H, Q] quantile closes or None)."""
    net.eval()
    outputs = net(torch.from_numpy(windows.inputs)).numpy()  # [N, H] or [N, H, Q]
    return to_forecasts(windows.last_close, outputs, scaler.mean_[0], scaler.scale_[0], net.levels)


def closes_only(windows: Windows) -> Windows | None:
    """The windows as a request of closes alone gives them (no day's range known), or None when
    the inputs are closes alone anyway."""
    if windows.inputs.shape[-1] == 1:
        return None
    inputs = windows.inputs.copy()
    inputs[..., 1:] = 0.0  # what features.scale_features gives a day without high and low
    return replace(windows, inputs=inputs)


def levels_of(net: LSTMNet) -> tuple[float, ...]:
    """The quantile levels reports use: the network's, or the baselines' default for a point model."""
    return tuple(net.levels) or LEVELS


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


class SameData(L.Callback):
    """Under DDP every process loads the data itself (data.source=auto downloads): the processes
    stop together, instead of training on different windows or hanging, when theirs differ."""

    def __init__(self, windows: Windows) -> None:
        self.digest = hashlib.sha256(windows.inputs.tobytes() + windows.targets.tobytes()).hexdigest()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        same = trainer.strategy.broadcast(self.digest, src=0) == self.digest
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RunError("the DDP processes loaded different training data (a download that changed "
                           "between them?): use data.source=csv or a data.cache_dir they share")


def fit(cfg: DictConfig, datamodule: StockDataModule,
        extra_loggers: tuple = ()) -> tuple[LSTMForecaster | None, str]:
    """Train cfg.model on the datamodule's train split with early stopping on its val split;
    return the val-best checkpoint's model and that checkpoint's path (under cfg.paths.output_dir).
    With model.calibrate, a quantile model is then calibrated on the val split (conformal);
    `forecaster.calibration` says how, or is None. Under DDP (trainer=ddp) every process trains
    its share of the windows; only global rank 0 gets the model, the others None."""
    distributed = world_size(cfg.trainer) > 1
    if distributed and not launched_externally():
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # Lightning would start the other processes as sys.argv again
            raise RunError("trainer: DDP runs from train.py (Lightning starts the other processes by "
                           "running its command again) or under torchrun/srun")
    L.seed_everything(cfg.seed, workers=True)  # after the data (which draws no random numbers)
    forecaster = build(cfg, "model")
    callbacks = [build(cfg, f"callbacks.{key}") for key in cfg.get("callbacks") or {}]
    if distributed:
        callbacks.append(SameData(datamodule.splits["train"]))
    loggers = [build(cfg, f"logger.{key}") for key in cfg.get("logger") or {}] + list(extra_loggers) or False
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
    if trainer.is_global_zero != is_global_zero():  # train() decided who publishes before this fit
        raise RunError(f"trainer: Lightning made this process global rank {trainer.global_rank}, the "
                       "environment (RANK, SLURM_PROCID, NODE_RANK, LOCAL_RANK) another")
    if not trainer.is_global_zero:
        return None, best  # rank 0 saved the checkpoint; it alone evaluates and exports
    # the val-best epoch, not the last one, is what gets evaluated and exported
    forecaster = type(forecaster).load_from_checkpoint(best, map_location="cpu")
    forecaster.calibration = None
    if forecaster.net.levels and forecaster.hparams.get("calibrate"):
        forecaster.calibration = calibrate(forecaster.net, datamodule.splits["val"])
        # the checkpoint becomes the model that is evaluated and exported, calibration included
        checkpoint = torch.load(best, map_location="cpu", weights_only=False)  # our own file
        checkpoint["state_dict"]["net.calibration"] = forecaster.net.calibration.clone()
        torch.save(checkpoint, best)
    return forecaster, best


def evaluate(forecaster: LSTMForecaster, datamodule: StockDataModule,
             splits: tuple[str, ...] = ("val", "test")) -> tuple[dict, dict]:
    """({split: ([N, H] forecast closes, [N, H, Q] quantiles or None)}, {split: compare() record,
    with the intervals of the model (if it has quantiles) and the baselines}) for the named splits."""
    windows, scaler, ticker = datamodule.splits, datamodule.scaler, datamodule.hparams.ticker
    outputs = {s: predict(forecaster.net, windows[s], scaler) for s in splits}
    forecasts = {s: point for s, (point, _) in outputs.items()}
    # the drift baseline's mean daily log return: the training period's (all of it, whatever share
    # of it data.center adds back to the model's forecasts)
    results = {s: compare(f, windows[s].future, windows[s].last_close, windows[s].dates, ticker, split=s,
                          drift=float(getattr(scaler, "train_mean_", scaler.mean_)[0]))
               for s, f in forecasts.items()}
    levels = levels_of(forecaster.net)
    for s, record in results.items():  # the range of the next closes: what risk users need
        w, quantiles = windows[s], outputs[s][1]
        returns = input_returns(w.inputs, scaler.mean_[0], scaler.scale_[0])
        methods = {} if quantiles is None else {"model": quantiles}
        if quantiles is not None and (alone := closes_only(w)) is not None:  # answers to closes alone
            methods["model_closes_only"] = predict(forecaster.net, alone, scaler)[1]
        methods.update(baseline_intervals(w.last_close, returns, w.future.shape[1], levels))
        record["intervals"] = compare_intervals(methods, w.future, w.last_close, levels)
    return outputs, results


def through(datamodule: StockDataModule) -> pd.Timestamp:
    """The date of the latest close in the datamodule's range."""
    hp = datamodule.hparams
    frame = load_prices(datamodule.path, on_suspicious="ignore")  # warned about when it was loaded
    return frame.loc[pd.Timestamp(hp.start) : pd.Timestamp(hp.end)].index[-1]


def refit_config(cfg: DictConfig) -> DictConfig:
    """cfg for the served model: every close up to cfg.refit.end, early stopping on the last
    cfg.refit.val of them, no test split; its own checkpoints folder."""
    final = cfg.copy()
    with open_dict(final):
        final.data.end, final.data.val, final.data.test = cfg.refit.end, cfg.refit.val, None
        final.paths.output_dir = str(Path(cfg.paths.output_dir) / "refit")  # its checkpoints/ too
    return final


def export(cfg: DictConfig, name: str, report: StockDataModule, served: StockDataModule,
           forecaster: LSTMForecaster, checkpoint: str, forecasts: dict, results: dict,
           refit: dict | None, data_sha256: str) -> Path:
    """Write model, scaler, meta, metrics.json (the report's test split) and forecast.png to
    <run folder>/artifacts; return that folder. `served` is the data the model was fit on."""
    output_dir = Path(cfg.paths.output_dir)
    folder = output_dir / "artifacts"
    hp, windows = served.hparams, served.splits
    root = Path(cfg.paths.root)
    commit, dirty = git_state(root)

    def span(w: dict) -> dict:
        return {s: [f"{x.dates[0]:%Y-%m-%d}", f"{x.dates[-1]:%Y-%m-%d}"] for s, x in w.items() if len(x)}

    last = windows["val"]
    from stockcast.promotion import fingerprint

    export_model(forecaster.net, folder, served.scaler, list(hp.features), meta={
        "name": name, "ticker": hp.ticker, "window": hp.window, "horizon": hp.horizon,
        # a quantile model's levels (the handler's intervals); [] for a point model
        "levels": forecaster.net.levels, "calibration": forecaster.calibration,
        # paths relative to the project root (paths.root); the checkpoint relative to run_dir
        "data": {"file": relative(served.path, root), "sha256": data_sha256,
                 "start": hp.start, "end": hp.end,
                 # the latest close the served model saw: its forecasts start the day after
                 "through": f"{through(served):%Y-%m-%d}",
                 "target_dates": span(windows), "report_target_dates": span(report.splits)},
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "seed": cfg.seed,
        "fingerprint": fingerprint(cfg),  # what a walk-forward backtest must share to be evidence
        "run_dir": relative(output_dir, root),
        "checkpoint": relative(checkpoint, output_dir),
        "metrics": results,  # the report's: the classic train/val/test split
        "refit": refit,  # the served model's fit on all data: its val (early stopping) split only
        "config": OmegaConf.to_container(cfg.model, resolve=True),
    }, sample=last.inputs)
    (folder / "metrics.json").write_text(json.dumps(results["test"], indent=2))
    t = report.splits["test"]
    point, quantiles = forecasts["test"]
    plot(folder / "forecast.png", t.dates, t.future, point, t.last_close, results["test"], quantiles,
         levels_of(forecaster.net))
    return folder


def fit_share(cfg: DictConfig, datamodule: StockDataModule, final_cfg: DictConfig | None,
              served: StockDataModule) -> dict:
    """A DDP process other than global rank 0: train its share of the report's fit and of the
    refit, then stop; rank 0 alone evaluates, exports, registers and gates. Return {}."""
    fit(cfg, datamodule)
    if final_cfg is not None:
        served.setup()
        fit(final_cfg, served)
    return {}


def train(cfg: DictConfig) -> dict:
    """Run one experiment: fit and evaluate on the classic split (the report), refit on all data
    (the served model), export, register a version, and promote it if the gate passes; return
    {"test": metrics.json record, "val": the same on val, "version", "gate"}, or {} on a DDP
    process other than global rank 0 (both fits are distributed, the rest happens once)."""
    name = run_name(cfg)
    for key in ("alpha", "min_forecasts", "min_folds", "max_age_days"):  # before any fitting
        if not isinstance(cfg.gate.get(key), (int, float)) or isinstance(cfg.gate.get(key), bool):
            raise RunError(f"gate.{key} must be a number, not {cfg.gate.get(key)!r}")
    final_cfg = refit_config(cfg) if cfg.refit.enabled else None
    served = datamodule = build(cfg, "data")
    if final_cfg is not None:  # one download, for the refit's wider range; the report takes its part
        served = build(final_cfg, "data")
        served.prepare_data()
        datamodule.path = served.path
    datamodule.prepare_data()
    datamodule.setup()
    if world_size(cfg.trainer) > 1:
        if not is_global_zero():
            return fit_share(cfg, datamodule, final_cfg, served)
        if cfg.gate.get("backtest", "auto") == "auto" and not cfg.gate.get("force"):
            # the walk-forward cannot train a DDP config (its folds are one process each: backtest
            # refuses it), so there is none to run; one of this exact config would still count
            log.warning("trainer: DDP; the gate judges on an existing walk-forward of this config only "
                        "(gate.backtest=never), else refuses: gate.force='<reason>' to promote")
            cfg = cfg.copy()
            with open_dict(cfg):
                cfg.gate.backtest = "never"
    run = Run(cfg, name, "train")
    ok = False
    try:
        forecaster, checkpoint = fit(cfg, datamodule, (run.epoch_logger("report"),))
        run.log_params(cfg)  # now that the config is known to resolve
        forecasts, results = evaluate(forecaster, datamodule)
        run.log_report(results, "report")
        log.info(table(results["test"]))
        log.info(interval_table(results["test"]["intervals"]))
        log.info(f"val rmse_ratio {results['val']['rmse_ratio']:.4f} (model choices: the walk-forward, "
                 "backtest.py)")
        refit = None
        if final_cfg is not None:
            served.setup()
            forecaster, checkpoint = fit(final_cfg, served, (run.epoch_logger("refit"),))
            refit = evaluate(forecaster, served, ("val",))[1]["val"]
            run.log_report(refit, "refit")
        # the sha256 of the file as it was read, not as it may be later
        folder = export(cfg, name, datamodule, served, forecaster, checkpoint, forecasts, results, refit,
                        sha256(served.path))
        run.log_files(folder, "export")
        from stockcast.promotion import publish_version  # it imports this module

        outcome = publish_version(cfg, name, folder, run)
        ok = True
    except NoCheckpoint as err:
        raise RunError(f"{err}: nothing to evaluate or publish, "
                       f"{Path(cfg.paths.artifacts_dir) / name} is left as it was") from None
    finally:
        run.end(ok)
    return {**results, **outcome}
