"""Test-split errors in price units for the model and two baselines, persistence ("tomorrow =
today") and a random walk with the training drift, and whether the differences are significant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from stockcast.features import interval_pairs

SIGNIFICANT = 0.05
BASELINES = {"persistence": "tomorrow = today", "drift": "the random walk with drift"}
LEVELS = (0.025, 0.1, 0.5, 0.9, 0.975)  # quantile levels: the median and the 80% and 95% intervals


def errors(forecast: np.ndarray, actual: np.ndarray, last_close: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, MAPE (%) and directional accuracy of [N, H] forecasts against [N, H] actual closes.

    Direction is the sign of (close - last close); persistence never predicts a move, so it only
    scores on days the price did not move either.
    """
    diff = forecast - actual
    moved = np.sign(actual - last_close[:, None])
    return {
        "mae": float(np.mean(np.abs(diff))),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "mape": float(100 * np.mean(np.abs(diff) / actual)),
        "directional_accuracy": float(np.mean(np.sign(forecast - last_close[:, None]) == moved)),
    }


def persistence_forecast(last_close: np.ndarray, horizon: int) -> np.ndarray:
    """[N] last closes -> [N, H]: every future close equals the last one."""
    return np.repeat(last_close[:, None], horizon, axis=1)


def drift_forecast(last_close: np.ndarray, horizon: int, drift: float) -> np.ndarray:
    """[N] last closes -> [N, H] closes of a random walk with drift: last close * exp(h * drift),
    `drift` the mean daily log return of the training period (never of the evaluated split)."""
    return last_close[:, None] * np.exp(drift * np.arange(1, horizon + 1))


def diebold_mariano(forecast: np.ndarray, baseline: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Diebold-Mariano test of equal squared-error loss, with the Harvey-Leybourne-Newbold
    small-sample correction: (statistic, two-sided p). A negative statistic: `forecast` has the
    lower loss. Arrays are [N] or [N, H].

    With H > 1 the loss of a window is its mean squared error over the H steps (so the test is about
    the same pooled loss as the RMSE); windows less than H apart share targets, so their loss
    differences are correlated up to lag H - 1, which the Newey-West variance and HLN factor cover.
    """
    def loss(f: np.ndarray) -> np.ndarray:  # [N] squared error per window, mean over its steps
        return np.mean(np.reshape((f - actual) ** 2, (len(actual), -1)), axis=1)

    h = actual.shape[1] if actual.ndim == 2 else 1
    return dm_test(loss(forecast), loss(baseline), h)


def dm_test(loss: np.ndarray, baseline_loss: np.ndarray, horizon: int = 1) -> tuple[float, float]:
    """Diebold-Mariano (HLN) on any per-window losses [N]: (statistic, two-sided p); a negative
    statistic: `loss` is lower. Windows less than `horizon` apart share targets (lags up to h - 1)."""
    d = np.asarray(loss, dtype=np.float64) - np.asarray(baseline_loss, dtype=np.float64)
    n, h = len(d), horizon
    hln = (n + 1 - 2 * h + h * (h - 1) / n) / n if n else 0.0
    if n < 2 or hln <= 0 or not np.any(d):
        return 0.0, 1.0  # no forecasts to compare, or identical losses: no evidence of a difference
    dev = d - d.mean()
    gamma = [np.dot(dev[k:], dev[: n - k]) / n for k in range(h)]  # autocovariances, lags 0..h-1
    var = (gamma[0] + 2 * sum(gamma[1:])) / n
    if var <= 0:  # Newey-West sums can go negative: fall back to lag 0, as R's forecast::dm.test
        var = gamma[0] / n
    if var <= 0:  # every window's difference the same, and not zero: as certain as it gets
        return float(np.sign(d.mean()) * np.inf), 0.0
    stat = d.mean() / np.sqrt(var) * np.sqrt(hln)
    return float(stat), float(2 * stats.t.sf(abs(stat), df=n - 1))


def always_up(actual: np.ndarray, last_close: np.ndarray) -> float:
    """Share of (window, step) pairs whose actual close is above the last close: the directional
    accuracy of a forecast that always says "up"."""
    return float(np.mean(actual > last_close[:, None]))


def direction_p(forecast: np.ndarray, actual: np.ndarray, last_close: np.ndarray) -> float:
    """Two-sided binomial p-value of the model's directional accuracy against the always-up rate.

    On the first step only: the binomial test counts independent calls, and with H > 1 a window's
    later steps share their days with the next windows' earlier ones.
    """
    moved = np.sign(actual[:, 0] - last_close)
    hits = int(np.sum(np.sign(forecast[:, 0] - last_close) == moved))
    return float(stats.binomtest(hits, len(moved), always_up(actual[:, :1], last_close)).pvalue)


def compare(forecast: np.ndarray, actual: np.ndarray, last_close: np.ndarray, dates: pd.DatetimeIndex,
            ticker: str, split: str = "test", *, drift: float) -> dict:
    """The metrics.json record: model, persistence and drift errors side by side, the RMSE ratios,
    the DM tests against both baselines and directional accuracy against always-up; `drift` is
    the training period's mean daily log return. The span keys are named for `split` (test_start,
    test_end, n_test for the test split)."""
    horizon = actual.shape[1]
    baselines = {"persistence": persistence_forecast(last_close, horizon),
                 "drift": drift_forecast(last_close, horizon, drift)}
    model, naive = errors(forecast, actual, last_close), errors(baselines["persistence"], actual, last_close)
    record = {
        "model": model,
        "persistence": naive,
        "rmse_ratio": model["rmse"] / naive["rmse"],
        "ticker": ticker,
        f"{split}_start": f"{dates[0]:%Y-%m-%d}",
        f"{split}_end": f"{dates[-1]:%Y-%m-%d}",
        f"n_{split}": int(len(actual)),
        # added with the drift baseline and the tests; the keys above keep their names
        "drift": errors(baselines["drift"], actual, last_close),
        "drift_mean_log_return": float(drift),
    }
    record["rmse_ratio_drift"] = model["rmse"] / record["drift"]["rmse"]
    for name, f in baselines.items():
        record[f"dm_stat_{name}"], record[f"dm_p_{name}"] = diebold_mariano(forecast, f, actual)
    record["always_up"] = always_up(actual, last_close)
    record["direction_p"] = direction_p(forecast, actual, last_close)
    return record


def fmt_p(p: float) -> str:
    """0.28, but 0.053 and 0.0012: near and below 0.05 two decimals would round across the line."""
    return f"{p:.2f}" if p >= 0.1 else f"{p:#.2g}"


def verdict(score: float, p: float, what: str, test: str = "DM") -> str:
    """Three-way wording: `score` < 0 means the model did better than `what` (lower loss)."""
    if p < SIGNIFICANT and score < 0:
        return f"better than {what} ({test} p = {fmt_p(p)})"
    if p < SIGNIFICANT and score > 0:
        return f"worse than {what} ({test} p = {fmt_p(p)})"
    return f"no significant difference from {what} ({test} p = {fmt_p(p)})"


def table(metrics: dict) -> str:
    """The metrics as a small text table for the terminal, with a verdict per baseline."""
    rows = [f"{'test ' + metrics['ticker']:<14}{'MAE':>9}{'RMSE':>9}{'MAPE %':>9}{'dir.acc':>9}"
            f"{'ratio':>9}{'DM stat':>9}{'DM p':>7}"]
    for name in ("model", *BASELINES):
        m = metrics[name]
        row = (f"{name:<14}{m['mae']:>9.4f}{m['rmse']:>9.4f}{m['mape']:>9.3f}"
               f"{m['directional_accuracy']:>9.3f}")
        if name != "model":
            row += (f"{metrics['model']['rmse'] / m['rmse']:>9.4f}{metrics[f'dm_stat_{name}']:>9.2f}"
                    f"{fmt_p(metrics[f'dm_p_{name}']):>7}")
        rows.append(row)
    rows.append(f"{'always up':<14}{'':>27}{metrics['always_up']:>9.3f}")
    span = f"{metrics['n_test']} days {metrics['test_start']}..{metrics['test_end']}"
    rows.append(f"rmse_ratio {metrics['rmse_ratio']:.4f} (model/persistence) on {span}: "
                + verdict(metrics["dm_stat_persistence"], metrics["dm_p_persistence"],
                          BASELINES["persistence"]))
    rows.append(f"rmse_ratio_drift {metrics['rmse_ratio_drift']:.4f} (model/drift): "
                + verdict(metrics["dm_stat_drift"], metrics["dm_p_drift"], BASELINES["drift"]))
    accuracy = metrics["model"]["directional_accuracy"]
    rows.append(f"dir.acc {accuracy:.3f} vs always up {metrics['always_up']:.3f}: "
                + verdict(metrics["always_up"] - accuracy, metrics["direction_p"], "always up",
                          test="binomial"))
    rows.append("ratio: model RMSE / the row's; DM: Diebold-Mariano on squared errors (HLN), two-sided")
    return "\n".join(rows)


def plot(path: Path, dates: pd.DatetimeIndex, actual: np.ndarray, forecast: np.ndarray,
         last_close: np.ndarray, metrics: dict, quantiles: np.ndarray | None = None,
         levels: tuple[float, ...] = LEVELS) -> None:
    """A fan chart of the first forecast step over the test period and its last 60 days: actual
    closes, the model and persistence, and the model's central intervals as bands (a quantile
    model); then the daily moves against the predicted move and bands, in % of the last close."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    bands = [] if quantiles is None else [(cov, quantiles[:, 0, lo], quantiles[:, 0, hi], alpha)
                                          for (cov, lo, hi), alpha in zip(reversed(interval_pairs(levels)),
                                                                          (0.15, 0.3, 0.45))]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), height_ratios=[3, 2, 2])
    recent = slice(-60, None)
    for ax, sl in ((axes[0], slice(None)), (axes[1], recent)):
        for cov, lower, upper, alpha in bands:
            ax.fill_between(dates[sl], lower[sl], upper[sl], color="tab:blue", alpha=alpha, lw=0,
                            step="mid", label=f"{100 * cov:g}% interval")
        ax.plot(dates[sl], actual[sl, 0], color="black", lw=1.4, label="actual close")
        ax.plot(dates[sl], forecast[sl, 0], color="tab:blue", lw=1.1, label="model")
        ax.plot(dates[sl], last_close[sl], color="tab:orange", lw=1.0, ls="--",
                label="persistence (tomorrow = today)")
        ax.grid(alpha=0.3)
        ax.set_ylabel("price")
    # the price panels hide the model's contribution: it is the gap to persistence, shown here
    def pct(x: np.ndarray) -> np.ndarray:
        return 100 * (x[recent] / last_close[recent] - 1)

    for cov, lower, upper, alpha in bands:
        axes[2].fill_between(dates[recent], pct(lower), pct(upper), color="tab:blue", alpha=alpha, lw=0,
                             step="mid", label=f"{100 * cov:g}% interval")
    axes[2].bar(dates[recent], pct(actual[:, 0]), color="dimgray", label="actual move")
    axes[2].plot(dates[recent], pct(forecast[:, 0]), color="tab:blue", marker=".", lw=1.0,
                 label="model's predicted move")
    axes[2].axhline(0, color="tab:orange", ls="--", lw=1.0, label="persistence (no move)")
    axes[2].set_ylabel("% vs last close")
    axes[2].grid(alpha=0.3)
    axes[2].legend(loc="upper left", fontsize=8)
    m, p = metrics["model"], metrics["persistence"]
    title = (f"{metrics['ticker']} test split: model RMSE {m['rmse']:.3f} vs persistence {p['rmse']:.3f} "
             f"(ratio {metrics['rmse_ratio']:.3f})")
    if bands and "model" in metrics.get("intervals", {}):
        iv = metrics["intervals"]["model"]
        title += "; coverage " + ", ".join(f"{100 * cov:g}%: {iv[f'coverage_{100 * cov:g}']:.3f}"
                                           for cov, *_ in reversed(bands))
    axes[0].set_title(title, fontsize=10)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].set_title("last 60 test days", fontsize=10)
    axes[2].set_title("last 60 test days: daily moves", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- intervals: the range of the next closes, against the volatility baselines risk people use ----


def ewma_sigma(returns: np.ndarray) -> np.ndarray:
    """[N, T] daily log returns, oldest first -> [N] RiskMetrics forecast of the next day's
    volatility: s2 <- lambda * s2 + (1 - lambda) * r^2 over the window (lambda 0.94), zero mean,
    started at the window's mean square (its weight after 59 returns is 0.94^59 = 2.6%). The
    formula is the quantile network's anchor (model.ewma_sigma), written once."""
    import torch

    from stockcast.model import ewma_sigma as sigma

    return sigma(torch.from_numpy(np.asarray(returns, dtype=np.float64))).numpy()


def ewma_quantiles(last_close: np.ndarray, returns: np.ndarray, horizon: int,
                   levels: tuple[float, ...] = LEVELS) -> np.ndarray:
    """[N] last closes, [N, T] window returns -> [N, H, Q] closes: the normal quantiles of the
    cumulative move to each step, sigma * sqrt(h), around the last close (zero mean)."""
    sigma = ewma_sigma(returns)[:, None, None] * np.sqrt(np.arange(1, horizon + 1))[None, :, None]
    z = stats.norm.ppf(levels)[None, None, :]
    return last_close[:, None, None] * np.exp(z * sigma)


def historical_quantiles(last_close: np.ndarray, returns: np.ndarray, horizon: int,
                         levels: tuple[float, ...] = LEVELS) -> np.ndarray:
    """[N, H, Q] closes from the empirical quantiles of the window's own returns (historical
    simulation), scaled by sqrt(h) for the cumulative move to step h."""
    q = np.quantile(returns, levels, axis=1).T  # [N, Q]
    scale = np.sqrt(np.arange(1, horizon + 1))[None, :, None]
    return last_close[:, None, None] * np.exp(q[:, None, :] * scale)


def intervals_of(levels: tuple[float, ...]) -> dict[str, tuple[int, int, float]]:
    """{"80": (lower index, upper index, nominal coverage), "95": ...}: the central intervals the
    levels hold (features.interval_pairs, named by their coverage in %)."""
    return {f"{100 * cov:g}": (lo, hi, cov) for cov, lo, hi in interval_pairs(levels)}


def interval_scores(quantiles: np.ndarray, actual: np.ndarray, last_close: np.ndarray,
                    levels: tuple[float, ...] = LEVELS) -> dict[str, np.ndarray]:
    """Per-window losses of [N, H, Q] quantile forecasts of [N, H] closes, in % of the last close
    (scale-free, so a period of high prices does not weigh more): for each interval its coverage
    (hit or not), width and interval score (Winkler; Gneiting & Raftery 2007), and the pinball
    loss averaged over the levels. Each [N], averaged over the H steps."""
    to_pct = 100 / last_close[:, None]
    y, q = actual * to_pct, quantiles * to_pct[..., None]
    out = {}
    for name, (lo, hi, coverage) in intervals_of(levels).items():
        lower, upper = q[..., lo], q[..., hi]
        alpha = 1 - coverage
        out[f"covered_{name}"] = np.mean((y >= lower) & (y <= upper), axis=1)
        out[f"width_{name}"] = np.mean(upper - lower, axis=1)
        out[f"score_{name}"] = np.mean((upper - lower) + 2 / alpha * np.maximum(lower - y, 0)
                                       + 2 / alpha * np.maximum(y - upper, 0), axis=1)
    tau = np.asarray(levels)
    miss = y[..., None] - q  # [N, H, Q]
    out["pinball"] = np.mean(np.maximum(tau * miss, (tau - 1) * miss), axis=(1, 2))
    return out


def compare_intervals(quantiles: dict[str, np.ndarray], actual: np.ndarray, last_close: np.ndarray,
                      levels: tuple[float, ...] = LEVELS, reference: str = "ewma") -> dict:
    """For each method (name -> [N, H, Q] closes): coverage of the 80% and 95% intervals with a
    binomial p-value against the nominal level, mean width (% of price), interval score and pinball
    loss; every other method's scores relative to `reference` with a DM p-value."""
    horizon = actual.shape[1]
    scores = {name: interval_scores(q, actual, last_close, levels) for name, q in quantiles.items()}
    record = {}
    for name, s in scores.items():
        row = {}
        for iv, (_, _, nominal) in intervals_of(levels).items():
            row[f"coverage_{iv}"] = float(np.mean(s[f"covered_{iv}"]))
            # the binomial test counts independent trials: the first step's (later steps overlap)
            first = (interval_scores(quantiles[name][:, :1], actual[:, :1], last_close, levels)
                     if horizon > 1 else s)[f"covered_{iv}"]
            row[f"coverage_{iv}_p"] = float(stats.binomtest(int(first.sum()), len(first), nominal).pvalue)
            row[f"width_{iv}"] = float(np.mean(s[f"width_{iv}"]))
            row[f"score_{iv}"] = float(np.mean(s[f"score_{iv}"]))
        row["pinball"] = float(np.mean(s["pinball"]))
        if name != reference and reference in scores:
            for key in (*(f"score_{iv}" for iv in intervals_of(levels)), "pinball"):
                row[f"{key}_ratio_{reference}"] = row[key] / float(np.mean(scores[reference][key]))
                row[f"{key}_dm_stat_{reference}"], row[f"{key}_dm_p_{reference}"] = dm_test(
                    s[key], scores[reference][key], horizon)
        record[name] = row
    return record


INTERVAL_BASELINES = {"ewma": ewma_quantiles, "historical": historical_quantiles}


def baseline_intervals(last_close: np.ndarray, returns: np.ndarray, horizon: int,
                       levels: tuple[float, ...] = LEVELS) -> dict[str, np.ndarray]:
    """{"ewma", "historical"} -> [N, H, Q] quantile closes from each window's own returns [N, T]."""
    return {name: f(last_close, returns, horizon, levels) for name, f in INTERVAL_BASELINES.items()}


def interval_table(record: dict) -> str:
    """compare_intervals()'s record as text: coverage against the nominal level, width, scores."""
    names = [k[len("coverage_"):] for k in next(iter(record.values())) if k.startswith("coverage_")
             and not k.endswith("_p")]  # "80", "95"
    widest = names[-1]
    rows = [f"{'intervals':<14}" + "".join(f"{'cov ' + n + '%':>9}{'p':>8}" for n in names)
            + f"{'width' + names[0] + '%':>10}" + "".join(f"{'score' + n:>9}" for n in names)
            + f"{'pinball':>9}  score{widest} vs EWMA (DM p)"]
    for name, r in record.items():
        versus = (f"{r[f'score_{widest}_ratio_ewma']:.3f} ({fmt_p(r[f'score_{widest}_dm_p_ewma'])})"
                  if f"score_{widest}_ratio_ewma" in r else "")
        rows.append(f"{name:<14}" + "".join(f"{r[f'coverage_{n}']:>9.3f}{fmt_p(r[f'coverage_{n}_p']):>8}"
                                            for n in names)
                    + f"{r[f'width_{names[0]}']:>10.2f}" + "".join(f"{r[f'score_{n}']:>9.2f}" for n in names)
                    + f"{r['pinball']:>9.3f}  {versus}".rstrip())
    rows.append("cov: share of closes inside the interval, p: binomial against the nominal level; width, "
                "scores (Winkler) and pinball in % of the last close, lower is better")
    return "\n".join(rows)
