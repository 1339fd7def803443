"""Test-split errors in price units, for the model and for persistence ("tomorrow = today")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


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


def compare(forecast: np.ndarray, actual: np.ndarray, last_close: np.ndarray, dates: pd.DatetimeIndex,
            ticker: str, split: str = "test") -> dict:
    """The metrics.json record: model and persistence errors side by side, and their RMSE ratio;
    the span keys are named for `split` (test_start, test_end, n_test for the test split)."""
    persistence = np.repeat(last_close[:, None], actual.shape[1], axis=1)
    model, naive = errors(forecast, actual, last_close), errors(persistence, actual, last_close)
    return {
        "model": model,
        "persistence": naive,
        "rmse_ratio": model["rmse"] / naive["rmse"],
        "ticker": ticker,
        f"{split}_start": f"{dates[0]:%Y-%m-%d}",
        f"{split}_end": f"{dates[-1]:%Y-%m-%d}",
        f"n_{split}": int(len(actual)),
    }


def table(metrics: dict) -> str:
    """The metrics as a small text table for the terminal."""
    rows = [f"{'test ' + metrics['ticker']:<14}{'MAE':>9}{'RMSE':>9}{'MAPE %':>9}{'dir.acc':>9}"]
    for name in ("model", "persistence"):
        m = metrics[name]
        rows.append(f"{name:<14}{m['mae']:>9.4f}{m['rmse']:>9.4f}{m['mape']:>9.3f}"
                    f"{m['directional_accuracy']:>9.3f}")
    verdict = "better" if metrics["rmse_ratio"] < 1 else "NOT better"
    rows.append(f"rmse_ratio {metrics['rmse_ratio']:.4f} (model/persistence: {verdict} than "
                f"tomorrow = today) on {metrics['n_test']} days {metrics['test_start']}.."
                f"{metrics['test_end']}")
    return "\n".join(rows)


def plot(path: Path, dates: pd.DatetimeIndex, actual: np.ndarray, forecast: np.ndarray,
         last_close: np.ndarray, metrics: dict) -> None:
    """Actual vs model vs persistence (first forecast step) over the test period and its last 60
    days, and the moves: what the model predicted against what happened, in % of the last close."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), height_ratios=[3, 2, 2])
    recent = slice(-60, None)
    for ax, sl in ((axes[0], slice(None)), (axes[1], recent)):
        ax.plot(dates[sl], actual[sl, 0], color="black", lw=1.4, label="actual close")
        ax.plot(dates[sl], forecast[sl, 0], color="tab:blue", lw=1.1, label="model")
        ax.plot(dates[sl], last_close[sl], color="tab:orange", lw=1.0, ls="--",
                label="persistence (tomorrow = today)")
        ax.grid(alpha=0.3)
        ax.set_ylabel("price")
    # the price panels hide the model's contribution: it is the gap to persistence, shown here
    moved = 100 * (actual[recent, 0] / last_close[recent] - 1)
    predicted = 100 * (forecast[recent, 0] / last_close[recent] - 1)
    axes[2].bar(dates[recent], moved, color="lightgray", label="actual move")
    axes[2].plot(dates[recent], predicted, color="tab:blue", marker=".", lw=1.0,
                 label="model's predicted move")
    axes[2].axhline(0, color="tab:orange", ls="--", lw=1.0, label="persistence (no move)")
    axes[2].set_ylabel("% vs last close")
    axes[2].grid(alpha=0.3)
    axes[2].legend(loc="upper left", fontsize=8)
    m, p = metrics["model"], metrics["persistence"]
    axes[0].set_title(
        f"{metrics['ticker']} test split: model RMSE {m['rmse']:.3f} vs persistence {p['rmse']:.3f} "
        f"(ratio {metrics['rmse_ratio']:.3f})"
    )
    axes[0].legend(loc="upper left")
    axes[1].set_title("last 60 test days", fontsize=10)
    axes[2].set_title("last 60 test days: daily moves", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
