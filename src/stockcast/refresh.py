"""Keep a model fresh: fetch the closes since the data's last date, retrain on all of them, judge
the new version by the gate, promote it if it passes, swap it into the running TorchServe without a
failed request, and score the forecasts that were served:

    python -m stockcast.refresh experiment=petr4          (make refresh EXPERIMENT=petr4)

New closes come from yfinance, else from CSV files dropped into data/incoming/ (any shape
load_prices reads; moved to data/incoming/done/ once appended). They are appended to
data/cache/<TICKER>.csv, which starts as a copy of the bundled snapshot; the snapshot is never
written. Every run appends one line to logs/refresh/<name>.jsonl: what arrived, what was trained,
the gate's verdict, which version serves, the swap, and the served forecasts' scores.

Exit codes: 0 done (a new champion serves; or the gate refused the candidate and the champion keeps
serving; or no new close arrived), 1 a step failed (one `error:` line names it), 2 bad data or
config (one `error:` line naming the file and row).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict

from stockcast.prices import DataError, check_ticker, download, live_path, load_prices, suspicious
from stockcast.training import run_or_exit, train  # registers ${ticker_name:}, which the config uses

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
# the project run from (a checkout, or the training image's /opt/stockcast: configs/, handlers/),
# else the checkout this module is in
CONFIGS = next((p for p in (Path.cwd() / "configs", ROOT / "configs") if (p / "train.yaml").exists()),
               ROOT / "configs")
# an overlapping close that differs by more than this after the adjustment factor is a revision
REVISED = 1e-3
# yfinance is asked from this many days before the last close, so the overlap tells the adjustment
OVERLAP_DAYS = 10
# the largest |log| adjustment factor accepted between a download and what is kept: dividends
# paid since the last refresh (PETR4's largest yearly yield in the data is below 20%)
MAX_ADJUSTMENT = 0.2
# calendar days between two closes beyond which closes are missing (B3's longest break, Carnival
# or the year's end with a weekend, is 5 days)
MAX_GAP_DAYS = 10


class RefreshError(RuntimeError):
    """A step that failed: the message is the one line the user sees."""


def write_prices(frame: pd.DataFrame, path: Path) -> None:
    """`frame` (close, and high/low if known) as a flat `Date,High,Low,Close` CSV, replaced whole."""
    out = pd.DataFrame({"Close": frame["close"]}, index=frame.index.rename("Date"))
    if {"high", "low"} <= set(frame):
        out.insert(0, "High", frame["high"])
        out.insert(1, "Low", frame["low"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    out.to_csv(partial, date_format="%Y-%m-%d")  # full precision: a rescale loses nothing
    os.replace(partial, path)


def live_frame(cfg: DictConfig) -> tuple[pd.DataFrame, Path]:
    """The refreshed prices of the experiment's ticker, started from the snapshot the first time."""
    path = live_path(Path(cfg.data.cache_dir), cfg.data.ticker)
    snapshot = load_prices(cfg.data.snapshot, on_suspicious="ignore")
    if not path.exists():
        write_prices(snapshot, path)
        log.info(f"{path}: started from the snapshot {cfg.data.snapshot}")
    live = load_prices(path, on_suspicious="ignore")
    if live.index[-1] < snapshot.index[-1] or len(live) < len(snapshot.loc[: live.index[-1]]):
        raise DataError(f"{path} ends {live.index[-1]:%Y-%m-%d} with {len(live)} closes, fewer than the "
                        f"snapshot {cfg.data.snapshot} holds (to {snapshot.index[-1]:%Y-%m-%d}): damaged? "
                        "Move it away and run again to start from the snapshot")
    return live, path


def incoming(cfg: DictConfig) -> tuple[pd.DataFrame | None, list[Path]]:
    """Closes of the ticker dropped into cfg.refresh.incoming (<TICKER>.csv, <TICKER>-*.csv or
    <TICKER>_*.csv), oldest file first, read by the same loader and checks as any price file; two
    files that disagree on a date are refused, naming both."""
    ticker = check_ticker(cfg.data.ticker)
    files = sorted((p for p in Path(cfg.refresh.incoming).glob(f"{ticker}*.csv")
                    if p.stem == ticker or p.stem[len(ticker):][:1] in ("-", "_")),
                   key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        return None, []
    frames = {f: load_prices(f, on_suspicious=cfg.data.on_suspicious) for f in files}
    merged = pd.concat([frame.assign(file=f.name) for f, frame in frames.items()]).sort_index(kind="stable")
    twice = merged[merged.index.duplicated(keep=False)]
    for day, rows in twice.groupby(level=0):
        if np.ptp(np.log(rows["close"].to_numpy())) > REVISED:
            raise DataError(f"{' and '.join(rows['file'])} disagree on the close of {day:%Y-%m-%d} "
                            f"({' vs '.join(f'{c:.6g}' for c in rows['close'])}): remove the wrong one")
    return merged[~merged.index.duplicated(keep="last")].drop(columns="file"), files


def downloaded(cfg: DictConfig, last: pd.Timestamp, today: date) -> pd.DataFrame:
    """yfinance's closes from OVERLAP_DAYS before `last` to today, through the same loader."""
    frame = download(cfg.data.ticker, (last - timedelta(days=OVERLAP_DAYS)).strftime("%Y-%m-%d"),
                     (today + timedelta(days=1)).isoformat())
    if frame is None or frame.empty:  # what yfinance answers offline, too
        raise RuntimeError(f"yfinance returned no rows for {cfg.data.ticker}")
    staged = Path(cfg.data.cache_dir) / f".{cfg.data.ticker}.download.csv"
    staged.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(staged)
    try:
        return load_prices(staged, on_suspicious=cfg.data.on_suspicious)
    finally:
        staged.unlink(missing_ok=True)


def merge(old: pd.DataFrame, new: pd.DataFrame, source: str,
          adjusts: bool) -> tuple[pd.DataFrame, int, float]:
    """`old` with the dates of `new` it lacks added: (merged, rows added, factor). New closes are
    checked before anything is kept:
    - where the two overlap they must agree. yfinance's (`adjusts`) may all differ by one factor:
      adjusted prices change when a dividend is paid, and that factor (within MAX_ADJUSTMENT)
      rescales `old`, so no fake return appears at the junction. A dropped file's must match.
    - the added closes, with the one before them, must not jump (an unadjusted split, a typo) or
      start after a gap of more than MAX_GAP_DAYS (missing closes).
    DataError naming the source and the date otherwise."""
    common = old.index.intersection(new.index)
    factor = 1.0
    if len(common) and adjusts:
        factor = float(new["close"].loc[common[-1]] / old["close"].loc[common[-1]])
        if abs(np.log(factor)) > MAX_ADJUSTMENT:
            raise DataError(f"{source}: its close of {common[-1]:%Y-%m-%d} is {factor:.4g}x the one kept: "
                            "not a dividend adjustment (a split? another ticker?); check the data")
    drift = np.abs(np.log(new["close"].loc[common] / (old["close"].loc[common] * factor)))
    if (drift > REVISED).any():
        day = drift.index[int(np.argmax(drift.to_numpy() > REVISED))]
        raise DataError(f"{source}: the close of {day:%Y-%m-%d} ({new['close'].loc[day]:.6g}) differs "
                        f"from the one kept ({old['close'].loc[day] * factor:.6g}"
                        f"{' after the adjustment factor' if factor != 1 else ''}): a revised price, or "
                        "another ticker's? Check it, then fix or remove that row")
    if abs(np.log(factor)) > 1e-9:
        old = old.copy()
        for column in ("close", "high", "low"):
            if column in old:
                old[column] = old[column] * factor
    added = new[~new.index.isin(old.index)].reindex(columns=old.columns)  # a range only if old had one
    if not len(added):
        return old, 0, factor
    merged = pd.concat([old, added]).sort_index()
    # the added closes beside their neighbours: jumps and gaps, whatever data.on_suspicious says
    where = merged.index.get_indexer(added.index)
    for i in where:
        if i > 0 and (merged.index[i] - merged.index[i - 1]).days > MAX_GAP_DAYS:
            raise DataError(f"{source}: the close of {merged.index[i]:%Y-%m-%d} comes "
                            f"{(merged.index[i] - merged.index[i - 1]).days} days after the one before it "
                            f"({merged.index[i - 1]:%Y-%m-%d}): closes are missing; add them too")
    around = merged["close"].iloc[max(0, where.min() - 1): where.max() + 2]
    if problems := suspicious(around):
        raise DataError(f"{source}: {'; '.join(problems)}: nothing was kept; fix or remove the file "
                        "and run again")
    return merged, len(added), factor


def fetch_new(cfg: DictConfig, today: date | None = None) -> dict:
    """Add the closes since the last one kept: yfinance first, else data/incoming/. Returns what
    happened: path, rows added, source, factor, the last close."""
    today = today or date.today()
    old, path = live_frame(cfg)
    source, files = "yfinance", []
    try:
        new = downloaded(cfg, old.index[-1], today)
    except DataError:
        raise
    except Exception as err:  # no network, rate limit: the folder of dropped files
        new, files = incoming(cfg)
        source = f"{cfg.refresh.incoming} ({', '.join(f.name for f in files)})" if files else \
            f"neither yfinance nor {cfg.refresh.incoming}"
        if new is None:
            log.info(f"yfinance unavailable ({(str(err).splitlines() or [type(err).__name__])[0][:100]}) "
                     f"and nothing in {cfg.refresh.incoming}")
    added, factor = 0, 1.0
    if new is not None and len(new):
        merged, added, factor = merge(old, new, source, adjusts=not files)
        if added or abs(np.log(factor)) > 1e-9:
            write_prices(merged, path)
        old = merged
    done = Path(cfg.refresh.incoming) / "done"
    for f in files:  # kept (or already known): moved out of the way of the next run, not deleted
        done.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), done / f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{f.name}")
    return {"file": str(path), "added": added, "source": source, "factor": factor,
            "through": f"{old.index[-1]:%Y-%m-%d}"}


def served_name(model_store: Path, name: str) -> str:
    """The model name experiment `name` is served under: lstm when lstm.mar holds it (or there is
    no lstm.mar yet), else its own name."""
    from stockcast.package import MODEL_NAME

    try:
        with zipfile.ZipFile(Path(model_store) / f"{MODEL_NAME}.mar") as z:
            return MODEL_NAME if json.loads(z.read("meta.json")).get("name") == name else name
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return MODEL_NAME


def package(cfg: DictConfig, name: str, served: str) -> Path:
    """The champion's archive, rebuilt with the workers and batching its current archive has (the
    profile `make package` chose), or the defaults for a first one."""
    from stockcast.package import MODEL_NAME, OTHER_TICKERS, build_archive
    from stockcast.serve import describe

    mar = Path(cfg.refresh.model_store) / f"{served}.mar"
    if mar.exists():
        overrides = describe(served, mar.read_bytes())["config"]
    else:
        overrides = {} if served == MODEL_NAME else OTHER_TICKERS
    return build_archive(Path(cfg.paths.artifacts_dir) / name, mar.parent,
                         handlers=CONFIGS.parent / "handlers", overrides=overrides, name=served)


def swap_in(cfg: DictConfig, served: str) -> dict:
    """Have the server running in cfg.refresh.serve_home serve model_store as it is now (a new
    version swapped in without a restart); what it serves afterwards. {} if no server runs."""
    from stockcast import serve

    home = Path(cfg.refresh.serve_home)
    if not (home / "server.json").exists() and not (home / "config.properties").exists():
        return {}
    with serve.locked(home):
        server, record = serve.running(home)
        if server is None:
            return {}
        args = argparse.Namespace(home=home, model_store=Path(cfg.refresh.model_store),
                                  handlers=CONFIGS.parent / "handlers",
                                  token_auth=record.get("token_auth", True), ports=list(record["ports"]))
        if not args.token_auth:
            log.warning(f"warning: the server in {home} runs without token auth, so its model API is "
                        "closed: the new version goes in by a restart, and requests fail for a few seconds")
        began = time.monotonic()
        try:
            server, restarted = serve.serve(args)
        except (RuntimeError, OSError) as err:
            raise RefreshError(f"swapping the new version in: {err}") from None
        took = time.monotonic() - began
        found = serve.workers(server, served)
    if isinstance(found, str):
        raise RefreshError(f"after the swap, TorchServe cannot describe {served}: {found}")
    return {"pid": server.pid, "restarted": restarted, "seconds": round(took, 2), "version": found[1],
            "ready_workers": found[0].count("READY")}


def archived_version(cfg: DictConfig, served: str) -> str | None:
    from stockcast.serve import describe

    mar = Path(cfg.refresh.model_store) / f"{served}.mar"
    try:
        return describe(served, mar.read_bytes())["version"]
    except (OSError, RuntimeError):
        return None


def read_log(path: Path) -> list[dict]:
    """The records of earlier runs; a line that is not one (a run killed while writing) is skipped
    with a warning naming it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except ValueError:
            log.warning(f"warning: {path}, line {number}: not a record (cut short?), skipped")
    return records


def serving_history(lines: list[dict], first: tuple[str, str] | None) -> list[tuple[str, str]]:
    """[(version, since)]: from the close of `since` on, `version` served (its forecasts are of the
    next trading day). `first` is the version that served before any refresh, since its last close."""
    history = [first] if first else []
    for line in lines:
        if line.get("serving") and (not history or history[-1][0] != line["serving"]):
            history.append((line["serving"], line["through"]))
    return history


def refresh(cfg: DictConfig) -> dict:
    """One refresh of experiment cfg.name at a time (a second one started meanwhile stops with
    RefreshError); the record appended to logs/refresh/<name>.jsonl."""
    Path(cfg.refresh.log_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.refresh.log_dir) / f".{cfg.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefreshError(f"another refresh of {cfg.name} is running (it holds {lock.name}): let it "
                               "finish; this one did nothing") from None
        return refresh_once(cfg)


def refresh_once(cfg: DictConfig) -> dict:
    name, began = cfg.name, time.monotonic()
    seconds: dict[str, float] = {}

    def lap(step: str, since: float) -> float:
        now = time.monotonic()
        seconds[step] = round(now - since, 2)
        return now

    log_file = Path(cfg.refresh.log_dir) / f"{name}.jsonl"
    lines = read_log(log_file)
    champion = Path(cfg.paths.artifacts_dir) / name / "meta.json"
    before = json.loads(champion.read_text()) if champion.exists() else None
    fetched = fetch_new(cfg)
    at = lap("fetch", began)
    how = f"from {fetched['source']}" if fetched["added"] else \
        f"(from {fetched['source']}: every close it had was kept already)" if "(" in fetched["source"] else \
        f"({fetched['source']} had any)"
    factor = f"; earlier closes rescaled by {fetched['factor']:.6f} (a new adjustment)" \
        if abs(np.log(fetched["factor"])) > 1e-9 else ""
    log.info(f"{fetched['added']} new close(s) {how}, through {fetched['through']}{factor}: "
             f"{fetched['file']}")
    served = served_name(Path(cfg.refresh.model_store), name)
    outcome: dict = {"promoted": False, "version": None, "gate": None}
    tried = max((line["through"] for line in lines if line.get("trained")), default="")
    if before and fetched["through"] <= max(before["data"]["through"], tried):
        log.info(f"version {before.get('version')} serves, trained through {before['data']['through']}"
                 + (f"; the last candidate was trained through {tried}" if tried > before["data"]["through"]
                    else "") + ": nothing new to train on")
    else:
        trained = cfg.copy()
        with open_dict(trained):
            trained.data.source, trained.data.snapshot = "csv", fetched["file"]
            trained.refit.enabled, trained.refit.end = True, fetched["through"]
        outcome = train(trained)
        at = lap("train", at)
    swapped: dict = {}
    if outcome["promoted"]:
        package(cfg, name, served)
        at = lap("package", at)
        swapped = swap_in(cfg, served)
        at = lap("swap", at)
        if swapped and swapped["version"] != outcome["version"]:
            raise RefreshError(f"version {outcome['version']} was promoted, but /predictions/{served} "
                               f"answers with version {swapped['version']}")
        where = (f"serving at /predictions/{served} (swap {swapped['seconds']:.1f} s, "
                 f"{'a restart' if swapped['restarted'] else 'no restart'})" if swapped else
                 f"in model_store/{served}.mar; no server runs in {cfg.refresh.serve_home}: make serve")
        log.info(f"version {outcome['version']} is the champion, {where}")
    elif outcome["version"]:
        log.warning(f"version {outcome['version']} refused ({outcome['gate']}); version "
                    f"{before and before.get('version')} keeps serving")
    serving = swapped.get("version") or archived_version(cfg, served)
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "through": fetched["through"],
              "new_closes": fetched["added"], "source": fetched["source"], "factor": fetched["factor"],
              "trained": outcome["version"], "promoted": outcome["promoted"], "gate": outcome["gate"],
              "served_as": served, "serving": serving, "swap": swapped or None}
    # the version serving before the first refresh, from the close it was trained through
    first = lines[0].get("first") if lines else (
        (before["version"], before["data"]["through"]) if before and before.get("version") else None)
    record["first"] = first
    failed = None
    try:
        record["quality"] = score(cfg, name, serving_history([*lines, record], first and tuple(first)))
    except (RefreshError, DataError, OSError, ValueError) as err:  # the refresh itself is done: kept
        record["quality"], failed = {"error": str(err)}, err
    seconds["total"] = round(time.monotonic() - began, 2)
    record["seconds"] = seconds
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:
        out.write(json.dumps(record) + "\n")
    if failed:
        raise RefreshError(f"scoring the served forecasts: {failed}")
    return record


def version_folder(cfg: DictConfig, name: str, version: str) -> Path:
    """Version `version`'s exported files, fetched from the registry (checksums checked) once into
    logs/refresh/versions/<name>/<version>."""
    from stockcast.registry import fetch
    from stockcast.tracking import client

    dest = Path(cfg.refresh.log_dir) / "versions" / name / version
    found = sorted(dest.rglob("meta.json"))
    if not found:
        staged = dest.with_name(f".{version}.partial")
        shutil.rmtree(staged, ignore_errors=True)
        fetch(client(cfg.paths.root), name, version, staged)
        os.replace(staged, dest)
        found = sorted(dest.rglob("meta.json"))
    return found[0].parent


def score(cfg: DictConfig, name: str, history: list[tuple[str, str]]) -> dict:
    """The served forecasts scored (stockcast.quality) over the last 20 and 60 trading days, each
    version recomputing what it served; pushed to the Pushgateway if cfg.refresh.pushgateway is set
    (a push that fails is in the record: "push_error")."""
    from stockcast import quality

    if not history:
        return {}
    frame = load_prices(live_path(Path(cfg.data.cache_dir), cfg.data.ticker), on_suspicious="ignore")
    # the versions that served the last max(WINDOWS) origins: the one serving at the first of
    # them, and every one since
    first = frame.index[max(0, len(frame) - max(quality.WINDOWS) - 1)]
    start = max([k for k, (_, since) in enumerate(history) if pd.Timestamp(since) <= first], default=0)
    serving, missing = [], []
    for version, since in history[start:]:
        try:
            folder = version_folder(cfg, name, version)
        except Exception as err:  # noqa: BLE001 - pruned from the registry, its store unreachable
            folder = None
            missing.append(f"version {version}: {' '.join(str(err).split())[:200]}")
        serving.append((version, since, folder))
    if serving[-1][2] is None:
        raise RefreshError(f"cannot score: the files of the serving {missing[-1]}")
    scored = quality.score(frame, serving)
    out: dict = {f"last_{n}": {k: None if not np.isfinite(v) else round(float(v), 6)
                               for k, v in quality.rolling(scored, n).items()} for n in quality.WINDOWS}
    out["volatility_ratio"] = round(quality.volatility_ratio(frame, serving[-1][2]), 4)
    if missing:  # their days are not scored
        out["unscored"] = missing
    if cfg.refresh.get("pushgateway"):
        try:
            quality.push(cfg.refresh.pushgateway, cfg.data.ticker, quality.exposition(frame, serving, scored))
            out["pushed_to"] = cfg.refresh.pushgateway
        except quality.PushError as err:
            out["push_error"] = str(err)
    return out



@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        record = run_or_exit(refresh, cfg)
    except RefreshError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    quality, shown = record["quality"], set()
    for n in (20, 60):
        q = quality.get(f"last_{n}") or {}
        if q.get("n") and q["n"] not in shown:
            shown.add(q["n"])
            covered = "" if q.get("coverage_80") is None else \
                f"; 80% interval covered {q['coverage_80']:.0%}, 95% {q['coverage_95']:.0%}"
            log.info(f"served, last {int(q['n'])} scored day(s): RMSE {q['rmse_ratio_persistence']:.3f}x "
                     f"persistence's, {q['rmse_ratio_drift']:.3f}x drift's{covered}")
    print(json.dumps({k: record[k] for k in ("through", "new_closes", "trained", "promoted", "serving",
                                             "seconds")}))
    if quality.get("push_error"):  # the model is refreshed; its monitoring is not
        print(f"error: {quality['push_error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("STOCKCAST_ROOT", str(CONFIGS.parent))
    main()
