"""Score what was served: each day's forecast of the next close, recomputed with the version that
served it, against the close that followed and the two baselines; the rolling figures and the input
drift pushed to a Prometheus Pushgateway. The refresh job calls it after each trading day:

    python -m stockcast.quality data/PETR4.SA.csv artifacts/petr4 --since 2024-10-01 [--push http://127.0.0.1:9091]

A served-version history (`Serving`) lists (version, since, folder): from the close of day `since`
on, that version served, and `folder` holds its export (meta.json, scaler.json, model.onnx).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from stockcast import exported
from stockcast.prices import load_prices

Serving = list[tuple[str, pd.Timestamp | date | str, Path]]
WINDOWS = (20, 60)  # trading days the figures roll over
VOLATILITY_DAYS = 20  # the recent returns the input-drift ratio reads
JOB = "stockcast_refresh"  # the Pushgateway grouping key's job
PREFIX = "stockcast_"
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")  # a label value the grouping-key URL can carry as it is


class PushError(RuntimeError):
    """The Pushgateway could not be reached or refused the push; the message is one line."""


def drift_of(meta: dict, mean: np.ndarray) -> float:
    """The drift baseline's mean daily log return, as the served version could know it: its own
    training period's mean (meta.json's refit record, else its report fit's when it had no refit),
    the number stockcast.evaluation compared it with; scaler.json's mean (equal with data.center 1,
    the default, and shrunk by data.center otherwise) when meta.json has neither."""
    record = meta.get("refit") or (meta.get("metrics") or {}).get("test") or {}
    return float(record.get("drift_mean_log_return", mean[0]))


def _serving_table(serving: Serving) -> list[tuple[str, pd.Timestamp, Path]]:
    return sorted(((str(v), pd.Timestamp(s).normalize(), f and Path(f)) for v, s, f in serving),
                  key=lambda r: r[1])


def score(frame: pd.DataFrame, serving: Serving, with_range: bool = False) -> pd.DataFrame:
    """One row per origin day d of `frame` (load_prices: dates, close, optional high/low) that has a
    next row, a serving version (the latest with since <= d) and that version's `window` closes up
    to d (a version whose folder is None is skipped, its days with it): the first-step forecast that
    version served, recomputed as the handler computes it (one
    ONNX run per version), the close that followed, persistence, drift and the 80%/95% bounds (NaN
    from a point model). Prices in the frame's currency. `with_range`: the requests carried each
    day's high and low (stockcast.forecast, the client, sends closes only)."""
    columns = ["date", "target_date", "version", "last_close", "forecast", "actual", "persistence",
               "drift", "lower_80", "upper_80", "lower_95", "upper_95"]
    closes = frame["close"].to_numpy(dtype=np.float64)
    dates = pd.DatetimeIndex(frame.index)
    table = _serving_table(serving)
    parts = []
    for k, (version, since, folder) in enumerate(table):
        until = table[k + 1][1] if k + 1 < len(table) else pd.Timestamp.max
        if folder is None:  # its files are gone: its days stay unscored, not given to another version
            continue
        model = exported.load(folder)
        w = model.window
        origins = np.flatnonzero((dates >= since) & (dates < until))
        origins = origins[(origins >= w - 1) & (origins + 1 < len(closes))]
        if not len(origins):
            continue
        rows = origins[:, None] - w + 1 + np.arange(w)  # [B, T] row numbers of each window
        high = low = None
        if with_range and {"high", "low"} <= set(frame.columns):
            high, low = frame["high"].to_numpy(np.float64)[rows], frame["low"].to_numpy(np.float64)[rows]
        point, quantiles = model.forecast(closes[rows], high, low)  # [B, H], [B, H, Q] or None
        last = closes[origins]
        part = pd.DataFrame({"date": dates[origins], "target_date": dates[origins + 1], "version": version,
                             "last_close": last, "forecast": point[:, 0], "actual": closes[origins + 1],
                             "persistence": last, "drift": last * np.exp(drift_of(model.meta, model.mean))})
        for level, lo, hi in model.intervals:
            name = f"{100 * level:g}"
            part[f"lower_{name}"], part[f"upper_{name}"] = quantiles[:, 0, lo], quantiles[:, 0, hi]
        parts.append(part.reindex(columns=columns))
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True).sort_values("date", ignore_index=True)


def rolling(scored: pd.DataFrame, n: int) -> dict[str, float]:
    """The figures over the last `n` scored days: RMSE (price units) of the model, persistence and
    drift, the ratios model/persistence and model/drift, the share of actual closes inside the 80%
    and 95% intervals (bounds included; NaN from a point model), and `n`, the days actually scored."""
    last = scored.sort_values("date").tail(n)
    rmse = {name: float(np.sqrt(np.mean((last[name] - last["actual"]) ** 2))) if len(last) else math.nan
            for name in ("forecast", "persistence", "drift")}
    out = {"n": len(last), "rmse_model": rmse["forecast"], "rmse_persistence": rmse["persistence"],
           "rmse_drift": rmse["drift"]}
    for baseline in ("persistence", "drift"):
        out[f"rmse_ratio_{baseline}"] = rmse["forecast"] / rmse[baseline] if rmse[baseline] > 0 else math.nan
    for level in ("80", "95"):
        inside = (last["actual"] >= last[f"lower_{level}"]) & (last["actual"] <= last[f"upper_{level}"])
        known = last[f"lower_{level}"].notna()
        out[f"coverage_{level}"] = float(inside[known].mean()) if known.any() else math.nan
    return out


def volatility_ratio(frame: pd.DataFrame, folder: Path, days: int = VOLATILITY_DAYS) -> float:
    """Input drift: the standard deviation of the last `days` daily log returns of `frame` over the
    one the version in `folder` was trained on (scaler.json's scale of log_return: StandardScaler's
    std of its training returns). 1 = as volatile as in training; unitless."""
    returns = np.diff(np.log(frame["close"].to_numpy(dtype=np.float64)))[-days:]
    scale = json.loads((Path(folder) / "scaler.json").read_text())["scale"][0]
    return float(np.std(returns, ddof=1) / scale) if len(returns) >= 2 else math.nan


def _escape(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _seconds(day) -> float:
    """A date -> seconds since 1970 at its midnight UTC (ModelTrainedThrough's convention)."""
    return pd.Timestamp(day).normalize().timestamp()  # a naive Timestamp is read as UTC


def exposition(frame: pd.DataFrame, serving: Serving, scored: pd.DataFrame, *,
               succeeded_at: float | None = None, windows: tuple[int, ...] = WINDOWS) -> str:
    """The figures in Prometheus' text format, for one ticker (its label comes from the push's
    grouping key): rolling RMSEs and ratios, coverage and days scored per window, the input
    volatility ratio, the serving version, when the refresh succeeded (`succeeded_at`, seconds
    since 1970; now by default) and the date of the last close it read (midnight UTC)."""
    version, since, folder = _serving_table(serving)[-1]
    meta = json.loads((folder / "meta.json").read_text())
    lines: list[str] = []

    def gauge(name: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        samples = [(labels, value) for labels, value in samples if math.isfinite(value)]
        if samples:
            lines.extend([f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} gauge"])
            for labels, value in samples:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{PREFIX}{name}{{{text}}} {value!r}" if text else f"{PREFIX}{name} {value!r}")

    figures = {n: rolling(scored, n) for n in windows}
    gauge("served_rmse", "RMSE of the served next-close forecasts and the baselines (price units)",
          [({"window": str(n), "forecaster": f}, figures[n][f"rmse_{f}"])
           for n in windows for f in ("model", "persistence", "drift")])
    gauge("served_rmse_ratio", "RMSE of the served forecasts over a baseline's (1 = as good)",
          [({"window": str(n), "baseline": b}, figures[n][f"rmse_ratio_{b}"])
           for n in windows for b in ("persistence", "drift")])
    gauge("served_interval_coverage", "share of actual closes inside the served interval (0-1)",
          [({"window": str(n), "level": lvl}, figures[n][f"coverage_{lvl}"])
           for n in windows for lvl in ("80", "95")])
    gauge("served_forecasts_scored", "served forecasts the rolling figures cover (days)",
          [({"window": str(n)}, float(figures[n]["n"])) for n in windows])
    gauge("input_volatility_ratio", f"std of the last {VOLATILITY_DAYS} daily log returns over the "
          "serving version's training std (1 = as in training)",
          [({"days": str(VOLATILITY_DAYS)}, volatility_ratio(frame, folder))])
    gauge("served_version_info", "the version serving now (always 1)",
          [({"version": version, "since": f"{since:%Y-%m-%d}",
             "trained_through": str((meta.get("data") or {}).get("through", ""))[:10]}, 1.0)])
    gauge("refresh_last_success_timestamp_seconds", "when the refresh last succeeded (seconds since 1970)",
          [({}, float(time.time() if succeeded_at is None else succeeded_at))])
    gauge("refresh_last_close_timestamp_seconds", "the last close the refresh read (its date, midnight UTC)",
          [({}, _seconds(frame.index[-1]))])
    return "\n".join(lines) + "\n"


def grouping_path(job: str, ticker: str) -> str:
    """/metrics/job/<job>/ticker/<ticker>, a value outside [A-Za-z0-9_-] (PETR4.SA, ^BVSP) in the
    Pushgateway's base64 form (URL-safe alphabet): ticker@base64/UEVUUjQuU0E="""
    def part(name: str, value: str) -> str:
        if _PLAIN.fullmatch(value):
            return f"{name}/{value}"
        return f"{name}@base64/{base64.urlsafe_b64encode(value.encode()).decode() or '='}"

    return f"/metrics/{part('job', job)}/{part('ticker', ticker)}"


def push(url: str, ticker: str, text: str, job: str = JOB, timeout: float = 10.0) -> None:
    """PUT `text` (exposition()) to the Pushgateway at `url` under job and ticker, replacing what
    that group held; PushError with one line if it cannot be reached or refuses it."""
    if not url.startswith(("http://", "https://")):
        raise PushError(f"the Pushgateway URL {url!r} needs its scheme: http://HOST:PORT")
    target = url.rstrip("/") + grouping_path(job, ticker)
    request = urllib.request.Request(target, data=text.encode(), method="PUT",
                                     headers={"Content-Type": "text/plain; version=0.0.4"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace").strip().replace("\n", " ")[:200]
        raise PushError(f"the Pushgateway at {url} refused the push ({err.code}): {body}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PushError(f"cannot reach the Pushgateway at {url}: {reason}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.quality", description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="the ticker's prices (any Yahoo CSV shape)")
    parser.add_argument("folder", type=Path, help="the served version's export (meta.json, model.onnx, ...)")
    parser.add_argument("--since", required=True, help="the first close it served (YYYY-MM-DD)")
    parser.add_argument("--push", metavar="URL", help="the Pushgateway, e.g. http://127.0.0.1:9091")
    args = parser.parse_args(argv)
    frame = load_prices(args.csv)
    meta = json.loads((args.folder / "meta.json").read_text())
    serving = [(str(meta.get("version", "")), args.since, args.folder)]
    scored = score(frame, serving)
    for n in WINDOWS:
        print(f"last {n}:", json.dumps({k: round(v, 4) for k, v in rolling(scored, n).items()}))
    ratio = volatility_ratio(frame, args.folder)
    print(f"input volatility ratio ({VOLATILITY_DAYS} days / training): {ratio:.3f}")
    if args.push:
        try:
            push(args.push, meta["ticker"], exposition(frame, serving, scored))
        except PushError as err:
            raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
