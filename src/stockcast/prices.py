"""Daily prices: download with yfinance, cache on disk, fall back to the bundled snapshot, clean."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MISSING = {"", "null", "nan", "NaN", "None"}


class DataError(ValueError):
    """A price file or download that cannot be used; the message names the file and the problem."""


def download(ticker: str, start: str, end: str) -> pd.DataFrame:
    """Daily bars from Yahoo Finance as yfinance returns them: (Price, Ticker) MultiIndex columns."""
    import yfinance as yf  # imported here: it is slow to import and only this path needs it

    logging.getLogger("yfinance").setLevel(logging.CRITICAL)  # it logs every failure as ERROR
    with warnings.catch_warnings():  # its own deprecation warnings are not the user's to fix
        warnings.simplefilter("ignore")
        return yf.download(
            ticker, start=start, end=end, auto_adjust=True, progress=False, multi_level_index=True
        )


def fetch(ticker: str, start: str, end: str, cache_dir: Path) -> Path:
    """Download `ticker` into `cache_dir` in yfinance's own CSV format, or reuse the cached file."""
    path = Path(cache_dir) / f"{ticker}_{start}_{end}.csv"
    if path.exists():
        return path
    frame = download(ticker, start, end)
    if frame is None or frame.empty:
        raise DataError(f"yfinance returned no rows for {ticker} {start}..{end}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    frame.to_csv(partial)
    partial.replace(path)  # a download cut short never poses as a complete cache file
    return path


def resolve(source: str, ticker: str, start: str, end: str, cache_dir: Path, snapshot: Path) -> Path:
    """The CSV to train on: `yfinance` downloads, `csv` reads `snapshot`, `auto` tries in that order."""
    if source == "csv":
        return Path(snapshot)
    if source not in ("auto", "yfinance"):
        raise DataError(f"data.source must be auto, yfinance or csv, not {source!r}")
    try:
        return fetch(ticker, start, end, cache_dir)
    except Exception as err:  # no network, rate limit, empty answer: all mean "use the snapshot"
        if source == "yfinance":
            raise DataError(f"could not download {ticker}: {err}") from err
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        frame = load_prices(snapshot)
        print(
            f"yfinance unavailable ({reason[:120]}); using snapshot {snapshot} "
            f"({frame.index[0]:%Y-%m-%d} .. {frame.index[-1]:%Y-%m-%d})"
        )
        return Path(snapshot)


def load_prices(path: str | Path) -> pd.DataFrame:
    """Read any of the three Yahoo CSV shapes; return a clean frame with a `close` column by date.

    Shapes: yfinance >= 0.2.51 (`Price`/`Ticker`/`Date` header rows), flat `Date,Open,...,Close`,
    and the classic export with `Adj Close` (preferred there: it matches yfinance's auto_adjust).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path}: file is empty")
    # yfinance writes three header rows; the data starts after the "Date,,,," row
    header_rows = 3 if lines[0].startswith("Price,") and len(lines) > 2 else 1
    try:
        raw = pd.read_csv(
            io.StringIO(text), header=0, skiprows=range(1, header_rows), dtype=str,
            keep_default_na=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a CSV file ({str(err).splitlines()[0]})") from err
    raw.columns = [str(c).strip() for c in raw.columns]
    date_col = raw.columns[0]
    close_col = "Adj Close" if "Adj Close" in raw.columns else "Close"
    if close_col not in raw.columns:
        raise DataError(f"{path}: no Close column (columns: {', '.join(raw.columns)})")
    first_line = header_rows + 1  # file line of raw row 0 (1-based)

    dates = pd.to_datetime(raw[date_col], errors="coerce", format="mixed")
    close_text = raw[close_col].str.strip()
    close = pd.to_numeric(close_text, errors="coerce")
    missing = close_text.isin(MISSING)
    for name, bad in (
        ("date", dates.isna()),
        ("Close is not a number", close.isna() & ~missing),
        ("Close is not a finite positive price", close.notna() & ~(np.isfinite(close) & (close > 0))),
    ):
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            value = raw[date_col].iloc[i] if name == "date" else close_text.iloc[i]
            what = "date is not a date" if name == "date" else name
            raise DataError(f"{path}, line {first_line + i}: {what} ({value!r})")

    frame = pd.DataFrame({"close": close.to_numpy()}, index=pd.DatetimeIndex(dates, name="date"))
    if "Volume" in raw.columns:
        frame["volume"] = pd.to_numeric(raw["Volume"].str.strip(), errors="coerce").to_numpy()
    frame = frame[~missing.to_numpy()]  # exchange holidays exported as rows of null
    frame = frame.sort_index()
    frame = frame[~frame.index.duplicated(keep="last")]
    if "volume" in frame:
        # old exports fill holidays with Volume 0 and the previous close: no trading happened
        stale = (frame["volume"] == 0) & (frame["close"] == frame["close"].shift())
        frame = frame[~stale.to_numpy()]
    if frame.empty:
        raise DataError(f"{path}: no numeric Close values")
    return frame[["close"]]
