"""Daily prices: download with yfinance, cache on disk, fall back to the bundled snapshot, clean."""

from __future__ import annotations

import io
import logging
import re
import warnings
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from stockcast.features import usable_range

log = logging.getLogger(__name__)

MISSING = {"", "null", "nan", "NaN", "None"}
# Yahoo symbols: PETR4.SA, ^BVSP, BRL=X, BTC-USD. No "/" or "\\": the ticker names files on disk.
TICKER = re.compile(r"[A-Za-z0-9^][A-Za-z0-9.^=_-]{0,30}")
# ISO dates, optionally with a time and the UTC offset older yfinance wrote ("2019-01-02
# 00:00:00-02:00"; B3 files switch between -02:00 and -03:00 with daylight saving time): the date
# part is the exchange's trading day, so it is kept and the rest dropped
ISO_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?")
NUMERIC_DATE = re.compile(r"\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}")  # 03/04/2020, 3.4.20, 20-4-3
# One-day moves beyond these factors are flagged as suspicious. The largest real moves in the
# bundled and shared files are -31% (BBDC4 2009-05-29), -29.7% (PETR4 2020-03-09) and +33% (BVSP
# 1999-01-15): x0.69 .. x1.33. A 2:1 split halves the close (x0.5), 3:1 gives x0.33, a reverse
# split x2 or more; x0.55 / x1.8 leaves a wide margin on both sides (a 3:2 split, x0.67, is
# indistinguishable from a crash and is not caught).
SUSPICIOUS_DOWN, SUSPICIOUS_UP = 0.55, 1.8
# A close that moves more than this (in |log|) and comes back at least half way the next day is a
# bad value (a x1.5 typo is 0.41). The largest such real pair in the bundled and shared files is
# PETR4 2020-03-12/13 (-0.229 then +0.201): 0.3 stays clear of it.
SPIKE = 0.3


class DataError(ValueError):
    """A price file or download that cannot be used; the message names the file and the problem."""


def check_ticker(ticker: str) -> str:
    """`ticker` if it is a plain Yahoo symbol; it names files, so a path in it is refused."""
    if not isinstance(ticker, str) or not TICKER.fullmatch(ticker):
        raise DataError(f"data.ticker {ticker!r} is not a ticker symbol like PETR4.SA or ^BVSP "
                        "(letters, digits and . ^ = _ - only)")
    return ticker


def ticker_name(ticker: str) -> str:
    """The experiment name a ticker gives: PETR4.SA -> petr4, ^BVSP -> bvsp, BTC-USD -> btc-usd."""
    base = re.sub(r"\.[A-Za-z]{1,4}$", "", str(ticker).strip().lstrip("^"))  # exchange suffix
    return re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-").lower() or "data"


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
    path = Path(cache_dir) / f"{check_ticker(ticker)}_{start}_{end}.csv"
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
        frame = load_prices(snapshot, on_suspicious="ignore")  # setup() loads it again and says
        print(
            f"yfinance unavailable ({reason[:120]}); using snapshot {snapshot} "
            f"({frame.index[0]:%Y-%m-%d} .. {frame.index[-1]:%Y-%m-%d})"
        )
        return Path(snapshot)


def latest_closes(ticker: str, cache_dir: Path, snapshot: Path, days: int = 370,
                  today: date | None = None) -> tuple[pd.DataFrame, str]:
    """The newest prices of `ticker` and where they came from: yfinance (the last `days` up to
    tomorrow, saved in `cache_dir`), else whichever ends latest of its cached files (the refreshed
    one, `live_path`, among them) and `snapshot`."""
    today = today or date.today()
    start, end = (today - timedelta(days=days)).isoformat(), (today + timedelta(days=1)).isoformat()
    cache_dir = Path(cache_dir)
    mine = {p for p in cache_dir.glob(f"{check_ticker(ticker)}_*.csv") if p.stem.rsplit("_", 2)[0] == ticker}
    try:
        path = fetch(ticker, start, end, cache_dir)
    except Exception as err:  # no network, rate limit, empty answer: the newest prices on disk
        found = []  # (last date, a cache file before the snapshot on the same date, kind, path)
        files = [("cache", p) for p in [*mine, live_path(cache_dir, ticker)]] + [("snapshot", Path(snapshot))]
        for kind, p in files:
            try:
                found.append((load_prices(p, on_suspicious="ignore").index[-1], kind == "cache", kind, p))
            except DataError:  # missing or damaged: skipped, not fatal
                continue
        if not found:
            reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
            raise DataError(f"no prices for {ticker}: yfinance failed ({reason}), no {ticker}_*.csv "
                            f"in {cache_dir}, no {snapshot}") from None
        _, _, kind, path = max(found)
        how = f"{kind} {path}"
    else:  # a file fetch found already there was downloaded earlier today, not now
        how = f"cache {path}" if path in mine else "yfinance"
    frame = load_prices(path)
    return frame, f"{how}, last close {frame.index[-1]:%Y-%m-%d}"


def live_path(cache_dir: Path, ticker: str) -> Path:
    """The file `make refresh` keeps up to date: the snapshot's rows and every close since."""
    return Path(cache_dir) / f"{check_ticker(ticker)}.csv"


def load_prices(path: str | Path, on_suspicious: str = "warn") -> pd.DataFrame:
    """Read any of the three Yahoo CSV shapes; return a clean frame with a `close` column by date,
    and `high` and `low` when the file has them (NaN on rows where they are missing or invalid).

    Shapes: yfinance >= 0.2.51 (`Price`/`Ticker`/`Date` header rows), flat `Date,Open,...,Close`,
    and the classic export with `Adj Close` (preferred there: it matches yfinance's auto_adjust).
    Legal but suspicious data (see `suspicious`) is logged as one warning line, or raised as a
    DataError with on_suspicious="error".
    """
    if on_suspicious not in ("warn", "error", "ignore"):
        raise DataError(f"data.on_suspicious must be warn or error, not {on_suspicious!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(errors="replace")
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a CSV file") from None
    except OSError as err:  # permissions, a device, an I/O error
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
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
    close_col = "Close"
    # some exports carry an Adj Close column that is null throughout: Close is then the price
    if "Adj Close" in raw.columns and not raw["Adj Close"].str.strip().isin(MISSING).all():
        close_col = "Adj Close"
    if close_col not in raw.columns:
        raise DataError(f"{path}: no Close column (columns: {', '.join(raw.columns)})")
    first_line = header_rows + 1  # file line of raw row 0 (1-based)

    dates = parse_dates(raw[date_col], path, first_line)
    close_text = raw[close_col].str.strip()
    close = pd.to_numeric(close_text, errors="coerce")
    missing = close_text.isin(MISSING)
    for name, bad in (
        ("Close is not a number", close.isna() & ~missing),
        ("Close is not a finite positive price", close.notna() & ~(np.isfinite(close) & (close > 0))),
    ):
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}, line {first_line + i}: {name} ({close_text.iloc[i]!r})")

    frame = pd.DataFrame({"close": close.to_numpy()}, index=pd.DatetimeIndex(dates, name="date"))
    if {"High", "Low"} <= set(raw.columns):  # the day's range: the data.features log_range input
        high, low = (pd.to_numeric(raw[c].str.strip(), errors="coerce").to_numpy() for c in ("High", "Low"))
        # a row without a usable range keeps its close: the range input is then marked missing
        usable = usable_range(high, low)
        frame["high"], frame["low"] = np.where(usable, high, np.nan), np.where(usable, low, np.nan)
    if "Volume" in raw.columns:
        frame["volume"] = pd.to_numeric(raw["Volume"].str.strip(), errors="coerce").to_numpy()
    frame = frame[~missing.to_numpy()]  # exchange holidays exported as rows of null
    frame = frame.sort_index(kind="stable")  # stable: of two rows for one date, the later stays last
    problems = conflicting_duplicates(frame["close"])
    frame = frame[~frame.index.duplicated(keep="last")]
    if "volume" in frame:
        # old exports fill holidays with Volume 0 and the previous close: no trading happened
        stale = (frame["volume"] == 0) & (frame["close"] == frame["close"].shift())
        frame = frame[~stale.to_numpy()]
    if frame.empty:
        raise DataError(f"{path}: no numeric Close values")
    problems += suspicious(frame["close"])
    if problems and on_suspicious != "ignore":
        message = f"{path}: suspicious data: {'; '.join(problems)}"
        if on_suspicious == "error":
            raise DataError(message + " (data.on_suspicious=error)")
        log.warning("warning: %s (check the file; data.on_suspicious=error stops here)", message)
    return frame[[c for c in ("close", "high", "low") if c in frame]]


def parse_dates(text: pd.Series, path: Path, first_line: int) -> pd.DatetimeIndex:
    """ISO dates (with or without time and UTC offset) -> dates; anything else stops at its line.

    Day-first and month-first files cannot be told apart row by row (03/04/2020), and guessing
    per row scrambles them silently, so only YYYY-MM-DD is accepted.
    """
    text = text.str.strip()
    iso = text.str.fullmatch(ISO_DATE.pattern, na=False)
    parsed = pd.to_datetime(text.str.slice(0, 10).where(iso), format="%Y-%m-%d", errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if not len(bad):
        return pd.DatetimeIndex(parsed)
    i, value = int(bad[0]), text.iloc[int(bad[0])]
    where = f"{path}, line {first_line + i}"
    if NUMERIC_DATE.fullmatch(value) and not iso.iloc[i]:
        why = ("" if re.match(r"\d{4}", value) else " (a two-digit year)" if not
               re.search(r"\d{4}", value) else " (day-first and month-first cannot be told apart)")
        raise DataError(f"{where}: date {value!r} is not YYYY-MM-DD{why}; save the file with ISO dates")
    raise DataError(f"{where}: date is not a date ({value!r})")


def conflicting_duplicates(close: pd.Series) -> list[str]:
    """Dates that appear more than once with different closes (sorted `close`; the last is kept)."""
    dup = close[close.index.duplicated(keep=False)]
    conflicts = [f"{d:%Y-%m-%d} ({' vs '.join(f'{v:g}' for v in g)})"
                 for d, g in dup.groupby(level=0) if g.nunique() > 1]
    if not conflicts:
        return []
    more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
    return [f"dates with two different closes, the last row kept: {', '.join(conflicts[:3])}{more}"]


def suspicious(close: pd.Series) -> list[str]:
    """One-day moves no real price makes: a close far off both neighbours that comes back the next
    day (a bad value), or a jump that stays (an unadjusted split). [] when there is none."""
    ratio = (close / close.shift()).to_numpy()  # ratio[i] = close[i] / close[i - 1]
    move = np.abs(np.log(ratio))
    jump = (ratio < SUSPICIOUS_DOWN) | (ratio > SUSPICIOUS_UP)
    found, back = [], -1
    for i in np.flatnonzero(jump | (move > SPIKE)):
        if i == back:  # the way back from the spike just reported
            continue
        day = f"{close.index[i]:%Y-%m-%d}"
        nxt = i + 1 < len(ratio)
        if (nxt and min(move[i], move[i + 1]) > SPIKE and (ratio[i] > 1) != (ratio[i + 1] > 1)
                and abs(np.log(ratio[i] * ratio[i + 1])) < min(move[i], move[i + 1]) / 2):
            factor = np.sqrt(ratio[i] / ratio[i + 1])  # vs the geometric mean of both neighbours
            found.append(f"{day} close {close.iloc[i]:g} is {factor:.3g}x its neighbours")
            back = i + 1
        elif jump[i]:
            found.append(f"{day} close x{ratio[i]:.2f} vs the day before, and it stays "
                         "(an unadjusted split?)")
    if len(found) > 5:
        found = [*found[:5], f"{len(found) - 5} more"]
    return found
