"""Walk-forward backtest: retrain at every origin on the history before it, forecast each day up to
the next origin, and pool the errors against persistence and drift (darts' historical_forecasts,
neuralforecast's cross_validation)."""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from stockcast.data import StockDataModule, make_windows
from stockcast.evaluation import (
    BASELINES,
    INTERVAL_BASELINES,
    always_up,
    baseline_intervals,
    compare_intervals,
    diebold_mariano,
    direction_p,
    drift_forecast,
    errors,
    interval_table,
    persistence_forecast,
    table,
)
from stockcast.features import input_returns, interval_pairs
from stockcast.launch import job_cpus, world_size
from stockcast.prices import DataError, load_prices
from stockcast.promotion import fingerprint
from stockcast.tracking import Run
from stockcast.training import NoCheckpoint, RunError, build, closes_only, fit, levels_of, predict, run_name

log = logging.getLogger(__name__)
COLUMNS = ["fold", "origin", "target_date", "step", "last_close", "actual", "model", "persistence", "drift"]
# quantile columns: model_q0.5, ewma_q0.025, ...; model_closes_only: a range model without ranges
INTERVAL_METHODS = ("model", "model_closes_only", *INTERVAL_BASELINES)


def quantile_columns(levels: tuple[float, ...]) -> list[str]:
    return [f"{name}_q{level}" for name in INTERVAL_METHODS for level in levels]


def levels_in(rows: pd.DataFrame) -> tuple[float, ...]:
    """The quantile levels a backtest.csv holds (its ewma_q<level> columns); () for none."""
    return tuple(float(c[len("ewma_q"):]) for c in rows.columns if c.startswith("ewma_q"))


@dataclass(frozen=True)
class Fold:
    """Rows are positions in the price frame: train and val targets < origin <= test targets < end."""

    index: int
    val_start: int  # first early-stopping target; everything before it trains
    origin: int  # first forecast target
    end: int  # one past the last forecast target (the next origin, or the end of the data)


def folds(dates: pd.DatetimeIndex, window: int, horizon: int, start: str, step: int,
          val: float) -> list[Fold]:
    """Origins every `step` rows from the first date >= `start`; each fold's val split is the last
    `val` fraction of the targets before its origin."""
    if step < 1 or not 0 < val < 1:
        raise DataError(f"backtest.step must be >= 1 and backtest.val in (0, 1) (got {step}, {val})")
    first = int(dates.searchsorted(pd.Timestamp(start)))
    last = len(dates) - horizon  # the last origin whose H targets are all in the data
    if first > last:
        raise DataError(f"backtest.start {start} leaves no target to forecast: the data ends "
                        f"{dates[-1]:%Y-%m-%d} (horizon {horizon})")
    out = []
    for i, origin in enumerate(range(first, last + 1, step)):
        n_val = max(1, round((origin - window) * val))
        out.append(Fold(i, origin - n_val, origin, min(origin + step, last + 1)))
    if out[0].val_start - window < 2:  # make_windows needs two training windows at the least
        raise DataError(f"backtest.start {start} leaves {max(first - window, 0)} targets before the first "
                        f"origin {dates[first]:%Y-%m-%d}: too few to train on (window {window})")
    return out


def run_fold(cfg: DictConfig, frame: pd.DataFrame, fold: Fold, path: str) -> pd.DataFrame:
    """Train on the rows before fold.origin and forecast its targets: COLUMNS, one row per
    (target date, step). Runs in a worker process with one torch thread."""
    import torch

    torch.set_num_threads(1)  # one fold per core: more threads per fold only fight each other
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available", "Seed set": per fold noise
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")  # the same few hints once per fold
    datamodule: StockDataModule = build(cfg, "data")
    hp = datamodule.hparams
    # the fold's frame ends with its last target's close: nothing after it exists for this fold
    part = frame.iloc[: fold.end + hp.horizon - 1]
    val, origin = (f"{part.index[i]:%Y-%m-%d}" for i in (fold.val_start, fold.origin))
    datamodule.path = Path(path)  # found once by the parent: no second download
    datamodule.splits, datamodule.scaler = make_windows(part, hp.window, hp.horizon, val, origin,
                                                        name=f"{path} (fold {fold.index}, origin {origin})",
                                                        center=hp.center, features=list(hp.features))
    windows = datamodule.splits
    # the invariant the backtest rests on: no training or early-stopping target at or after the origin
    assert windows["val"].dates[-1] < windows["test"].dates[0] == part.index[fold.origin]
    test, scaler = windows["test"], datamodule.scaler
    members, member_quantiles = [], []  # backtest.seeds > 1: a seed ensemble, its members' log
    # forecasts averaged (quantiles too: Vincentization)
    for k in range(int(cfg.backtest.get("seeds") or 1)):
        member = cfg.copy()
        with open_dict(member):
            member.seed = int(cfg.seed) + 1000 * k
            if k and member.get("callbacks") and "model_checkpoint" in member.callbacks:  # own folder
                member.callbacks.model_checkpoint.dirpath = f"{cfg.paths.output_dir}/checkpoints-seed{k}"
        try:
            forecaster, _ = fit(member, datamodule)
        except NoCheckpoint as err:
            raise RunError(f"fold {fold.index} (origin {origin}): {err}: nothing to forecast") from None
        point, quantiles = predict(forecaster.net, test, scaler)
        members.append(np.log(point))
        if quantiles is not None:
            alone = closes_only(test)  # with ranges in the inputs: also the answers to closes alone
            member_quantiles.append({"model": np.log(quantiles), **(
                {} if alone is None else {"model_closes_only": np.log(predict(forecaster.net, alone, scaler)[1])})})
    horizon, levels = hp.horizon, levels_of(forecaster.net)
    # the mean of log prices = the forecast from the mean of the members' returns (cumsum is linear)
    forecasts = {"model": np.exp(np.mean(members, axis=0)),
                 "persistence": persistence_forecast(test.last_close, horizon),
                 # the drift of this fold's training period (all of it, whatever data.center keeps)
                 "drift": drift_forecast(test.last_close, horizon, float(scaler.train_mean_[0]))}
    returns = input_returns(test.inputs, scaler.mean_[0], scaler.scale_[0])  # [N, T]
    methods = baseline_intervals(test.last_close, returns, horizon, levels)
    if member_quantiles:
        methods = {name: np.exp(np.mean([m[name] for m in member_quantiles], axis=0))
                   for name in member_quantiles[0]} | methods
    quantiles = {f"{name}_q{level}": q[..., i].ravel()
                 for name, q in methods.items() for i, level in enumerate(levels)}
    n = len(test)
    target = np.arange(n)[:, None] + np.arange(horizon)  # [N, H] row of each target, from the origin
    return pd.DataFrame({
        "fold": fold.index,
        "origin": part.index[fold.origin],
        "target_date": part.index[fold.origin + target.ravel()],
        "step": np.tile(np.arange(1, horizon + 1), n),
        "last_close": np.repeat(test.last_close, horizon),
        "actual": test.future.ravel(),
        **{k: f.ravel() for k, f in forecasts.items()},
        **quantiles,
    })[COLUMNS + [c for c in quantile_columns(levels) if c in quantiles]]


def pooled(rows: pd.DataFrame, ticker: str) -> dict:
    """The report over every fold's forecasts, in compare()'s keys, plus per-fold ratios."""
    horizon = int(rows["step"].max())

    def wide(column: str) -> np.ndarray:  # [N, H], one row per forecast window
        return rows[column].to_numpy().reshape(-1, horizon)

    actual, last_close = wide("actual"), wide("last_close")[:, 0]
    forecasts = {k: wide(k) for k in ("model", *BASELINES)}
    record = {k: errors(f, actual, last_close) for k, f in forecasts.items()}
    first = rows[rows["step"] == 1]
    record.update({
        "ticker": ticker, "n_test": len(actual),
        "test_start": f"{first['target_date'].iloc[0]:%Y-%m-%d}",
        "test_end": f"{first['target_date'].iloc[-1]:%Y-%m-%d}",
        "rmse_ratio": record["model"]["rmse"] / record["persistence"]["rmse"],
        "rmse_ratio_drift": record["model"]["rmse"] / record["drift"]["rmse"],
        "mae_ratio": record["model"]["mae"] / record["persistence"]["mae"],
        "mae_ratio_drift": record["model"]["mae"] / record["drift"]["mae"],
        "always_up": always_up(actual, last_close),
        "direction_p": direction_p(forecasts["model"], actual, last_close),
    })
    for name in BASELINES:
        record[f"dm_stat_{name}"], record[f"dm_p_{name}"] = diebold_mariano(
            forecasts["model"], forecasts[name], actual)
    levels = levels_in(rows)
    if levels:
        record["intervals"] = compare_intervals(
            {name: np.stack([wide(f"{name}_q{level}") for level in levels], axis=-1)
             for name in INTERVAL_METHODS if f"{name}_q0.5" in rows.columns}, actual, last_close, levels)

    def rmse(g: pd.DataFrame, column: str) -> float:
        return float(np.sqrt(np.mean((g[column] - g["actual"]) ** 2)))

    record["folds"] = [
        {"fold": int(i), "origin": f"{g['origin'].iloc[0]:%Y-%m-%d}",
         "first_target": f"{g['target_date'].min():%Y-%m-%d}",
         "last_target": f"{g['target_date'].max():%Y-%m-%d}", "n": int((g["step"] == 1).sum()),
         "rmse_ratio": rmse(g, "model") / rmse(g, "persistence"),
         "rmse_ratio_drift": rmse(g, "model") / rmse(g, "drift")}
        for i, g in rows.groupby("fold")
    ]
    return record


ROLLING = 63  # trading days (a quarter) in the rolling coverage of the backtest plot


def plot_backtest(path: Path, rows: pd.DataFrame, record: dict) -> None:
    """Cumulative (model - persistence) squared error over the target dates (falling: the model
    helps), each fold's RMSE ratios, and the rolling coverage of the intervals against their
    nominal levels (the model's, solid, and EWMA's, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = rows[rows["step"] == 1]
    levels = levels_in(rows)
    pairs = interval_pairs(levels) if levels else []
    fig, axes = plt.subplots(3 if pairs else 2, 1, figsize=(11, 10 if pairs else 7))
    for name, color in (("persistence", "tab:orange"), ("drift", "tab:green")):
        gap = (first["model"] - first["actual"]) ** 2 - (first[name] - first["actual"]) ** 2
        axes[0].plot(first["target_date"], gap.cumsum(), color=color, label=f"model - {name}")
    for origin in first.groupby("fold")["target_date"].min():
        axes[0].axvline(origin, color="lightgray", lw=0.6)
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_ylabel("cumulative squared-error difference")
    axes[0].set_title(f"{record['ticker']} walk-forward, step 1: below 0 the model helped "
                      f"(RMSE ratio {record['rmse_ratio']:.4f}, DM p {record['dm_p_persistence']:.2f})")
    axes[0].legend(loc="upper left")
    per_fold = pd.DataFrame(record["folds"])
    x = np.arange(len(per_fold))
    axes[1].bar(x - 0.2, per_fold["rmse_ratio"], 0.4, color="tab:orange", label="vs persistence")
    axes[1].bar(x + 0.2, per_fold["rmse_ratio_drift"], 0.4, color="tab:green", label="vs drift")
    axes[1].axhline(1, color="black", lw=0.8)
    low, high = per_fold[["rmse_ratio", "rmse_ratio_drift"]].stack().agg(["min", "max"])
    axes[1].set_ylim(min(low, 0.99) - 0.005, max(high, 1.01) + 0.005)
    axes[1].set_xticks(x, per_fold["origin"], rotation=60, fontsize=7)
    axes[1].set_ylabel("model RMSE / baseline's")
    axes[1].set_title("per fold (origin date): below 1 the model was better", fontsize=10)
    axes[1].legend(loc="upper left", fontsize=8)
    for (coverage, lo, hi), color in zip(pairs, ("tab:blue", "tab:purple"), strict=False):
        for method, style in (("model", "-"), ("ewma", "--")):
            lower, upper = (f"{method}_q{levels[i]}" for i in (lo, hi))
            if lower not in first:
                continue
            inside = ((first["actual"] >= first[lower]) & (first["actual"] <= first[upper])).astype(float)
            axes[2].plot(first["target_date"], inside.rolling(ROLLING).mean(), color=color, ls=style,
                         lw=1.0, label=f"{method} {100 * coverage:g}%")
        axes[2].axhline(coverage, color=color, lw=0.8, alpha=0.6)
    if pairs:
        axes[2].set_ylabel(f"coverage, rolling {ROLLING} days")
        axes[2].set_title("step 1 intervals: share of closes inside, against the nominal levels "
                          "(horizontal lines)", fontsize=10)
        axes[2].legend(loc="lower left", fontsize=8, ncol=4)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fold_processes(n_jobs: int) -> int:
    """Folds trained at once for backtest.n_jobs: -1 one per CPU of this job (launch.job_cpus: fewer
    when a launcher runs jobs side by side), -2 all but one, as joblib counts."""
    return max(1, job_cpus() + 1 + n_jobs if n_jobs < 0 else n_jobs)


def backtest(cfg: DictConfig) -> dict:
    """Run every fold (in parallel), write backtest.csv/json/png to the run folder and
    backtest.out_dir; return the backtest.json record."""
    from joblib import Parallel, delayed

    started = time.perf_counter()
    name = run_name(cfg)
    if world_size(cfg.trainer) > 1:
        raise RunError("trainer: the walk-forward's folds are its parallelism, each one process on one "
                       "core; run it without trainer=ddp")
    datamodule: StockDataModule = build(cfg, "data")
    datamodule.prepare_data()
    hp = datamodule.hparams
    frame = load_prices(datamodule.path, on_suspicious=hp.on_suspicious)
    bt = cfg.backtest
    last = pd.Timestamp(hp.end)
    if bt.get("until") is not None:
        # the selection folds end there: no origin and no forecast target after it, so the later
        # days stay unseen until a held-out run (backtest.start after until)
        try:
            last = min(last, pd.Timestamp(str(bt.until)))
        except ValueError:
            raise DataError(f"backtest.until must be a date (YYYY-MM-DD) or null, not {bt.until!r}") from None
    frame = frame.loc[pd.Timestamp(hp.start) : last]
    plan = folds(frame.index, hp.window, hp.horizon, str(bt.start), int(bt.step), float(bt.val))
    output_dir = Path(cfg.paths.output_dir)
    jobs = []
    for fold in plan:
        fold_cfg = cfg.copy()
        with open_dict(fold_cfg):
            fold_cfg.paths.output_dir = str(output_dir / "folds" / f"{fold.index:03d}")
            fold_cfg.seed = int(cfg.seed) + fold.index  # deterministic, and not one seed for all
            fold_cfg.trainer.enable_progress_bar = False  # workers' bars interleave
        OmegaConf.resolve(fold_cfg)  # here: ${hydra:...} and ${now:} do not resolve in a worker
        jobs.append(delayed(run_fold)(fold_cfg, frame, fold, str(datamodule.path)))
    log.info(f"{name}: {len(plan)} folds, origins {frame.index[plan[0].origin]:%Y-%m-%d} .. "
             f"{frame.index[plan[-1].origin]:%Y-%m-%d} every {bt.step} trading days")
    n_jobs = fold_processes(int(bt.n_jobs))
    # processes always: inside a worker of hydra/launcher=joblib, joblib's default is threads, and
    # Lightning fits in threads of one process share its seed and its thread setting
    rows = pd.concat(Parallel(n_jobs=n_jobs, backend="loky" if n_jobs > 1 else "sequential")(jobs),
                     ignore_index=True)

    record = pooled(rows, hp.ticker)
    record.update({"window": hp.window, "horizon": hp.horizon, "step": int(bt.step),
                   "val": float(bt.val), "until": bt.get("until"), "seeds": int(bt.get("seeds") or 1),
                   "data_end": f"{frame.index[-1]:%Y-%m-%d}",
                   # what backtest.py returns and hparams_search minimises: the target is
                   # <= 1 against both baselines, so the worse of the two ratios
                   "objective": max(record["rmse_ratio"], record["rmse_ratio_drift"]),
                   "wall_time_s": round(time.perf_counter() - started, 1),
                   # the gate takes this as evidence only for a model trained with the same config
                   "fingerprint": fingerprint(cfg)})
    for out in (output_dir, Path(bt.out_dir)):
        out.mkdir(parents=True, exist_ok=True)
        rows.to_csv(out / "backtest.csv", index=False, float_format="%.6f", date_format="%Y-%m-%d")
        (out / "backtest.json").write_text(json.dumps(record, indent=2))
        plot_backtest(out / "backtest.png", rows, record)
    run = Run(cfg, name, "backtest")  # tracked next to the training runs of `name`
    run.log_params(cfg)
    run.log_report({k: v for k, v in record.items() if k != "folds"}, "walk_forward")
    for file in ("backtest.csv", "backtest.json", "backtest.png"):
        run.log_file(output_dir / file)
    run.end(True)
    log.info(f"walk-forward {hp.ticker}: {len(plan)} folds, horizon {hp.horizon}, "
             f"{record['wall_time_s']:.0f} s")
    log.info(table(record))
    log.info(interval_table(record["intervals"]))
    log.info(f"backtest: {Path(bt.out_dir)}  (run folder: {output_dir})")
    return record
