"""Loading every Yahoo CSV shape and quirk, the yfinance path (faked) and clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yfinance as yf
from conftest import ROOT, random_walk, write_flat_csv, yfinance_frame

from stockcast.prices import DataError, check_ticker, fetch, load_prices, resolve, ticker_name


def test_bundled_yfinance_shape_loads_with_real_values():
    frame = load_prices(ROOT / "data" / "PETR4.SA.csv")
    assert frame.index[0] == pd.Timestamp("2015-01-02")
    assert frame.index[-1] == pd.Timestamp("2024-12-30")
    assert frame["close"].iloc[-1] == pytest.approx(33.523006439208984)
    assert frame.index.is_monotonic_increasing and frame.index.is_unique
    # the 10 Volume-0 holiday rows that repeat the previous close are gone, trading days stay
    assert len(frame) == 2477


@pytest.mark.parametrize("name", ["VALE3.SA.csv", "ITUB4.SA.csv"])
def test_bundled_flat_shape_loads(name):
    frame = load_prices(ROOT / "data" / name)
    assert frame.index[0] == pd.Timestamp("2010-01-04") and len(frame) > 3600
    assert np.isfinite(frame["close"]).all() and (frame["close"] > 0).all()
    # each day's range, for data.features=[log_return, log_range, has_range]
    assert list(frame.columns) == ["close", "high", "low"] and (frame["high"] >= frame["low"]).all()


def test_a_row_without_a_usable_range_keeps_its_close(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("Date,Open,High,Low,Close,Volume\n"
                    "2020-01-02,10,10.5,9.5,10,100\n"
                    "2020-01-03,10,9.0,11.0,10.2,100\n"  # high below low: not a range
                    "2020-01-06,10,n/a,9.9,10.1,100\n")
    frame = load_prices(path)
    assert frame["close"].tolist() == [10.0, 10.2, 10.1]
    assert frame["high"].iloc[0] == 10.5 and frame[["high", "low"]].iloc[1:].isna().all().all()


def test_classic_export_uses_adj_close_and_drops_holiday_rows(tmp_path):
    path = tmp_path / "BBDC4.SA.csv"
    path.write_text(
        "Date,Open,High,Low,Close,Adj Close,Volume\n"
        "2018-02-09,10,10,10,10.0,5.0,100\n"
        "2018-02-12,null,null,null,null,null,null\n"  # exchange holiday exported as nulls
        "2018-02-14,10,10,10,10.5,5.25,0\n"  # Volume 0 but a new close: kept (index-like rows)
        "2018-02-15,10,10,10,10.5,5.25,0\n"  # Volume 0 repeating the close: a holiday, dropped
        "2018-02-16,10,10,10,11.0,5.5,300\n"
    )
    frame = load_prices(path)
    assert frame["close"].tolist() == [5.0, 5.25, 5.5]
    assert list(frame.index.strftime("%m-%d")) == ["02-09", "02-14", "02-16"]


def test_unsorted_and_duplicated_dates_are_sorted_and_deduplicated(tmp_path, caplog):
    path = tmp_path / "x.csv"
    path.write_text("Date,Close,Volume\n2020-01-03,10.3,1\n2020-01-01,10,1\n2020-01-02,10.2,1\n"
                    "2020-01-03,10.35,1\n2020-01-02,10.2,1\n")  # 01-02 twice, the same close: fine
    frame = load_prices(path)
    assert frame["close"].tolist() == [10, 10.2, 10.35]
    # the conflicting date is named in one warning line; the identical repeat is not
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}: suspicious data: dates with two different closes, the last row kept: "
        "2020-01-03 (10.3 vs 10.35) (check the file; data.on_suspicious=error stops here)"]
    with pytest.raises(DataError, match="2020-01-03 .10.3 vs 10.35. .data.on_suspicious=error.$"):
        load_prices(path, on_suspicious="error")


def test_real_gaps_are_kept_not_filled(tmp_path):
    walk = random_walk(40)
    gap = walk.drop(walk.index[10:15])  # like PETR4's 2011-07-28 .. 08-17 hole or Carnival
    frame = load_prices(write_flat_csv(tmp_path / "g.csv", gap))
    assert len(frame) == 35 and walk.index[12] not in frame.index


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("Date,Open,Volume\n2020-01-01,1,1\n", "no Close column"),
        ("Date,Close\n2020-01-01,1\n2020-01-02,abc\n", "line 3: Close is not a number ('abc')"),
        ("Date,Close\n2020-01-01,1\n2020-01-02,-4\n", "line 3: Close is not a finite positive"),
        ("Date,Close\n2020-01-01,0\n", "line 2: Close is not a finite positive"),
        ("Date,Close\n2020-01-01,inf\n", "line 2: Close is not a finite positive"),
        ("Date,Close\nyesterday,1\n", "line 2: date is not a date ('yesterday')"),
        ("Date,Close\n2020-01-01,null\n", "no numeric Close values"),
        ("", "file is empty"),
    ],
)
def test_bad_files_name_the_file_line_and_problem(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(DataError) as err:
        load_prices(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_yfinance_shape_line_numbers_count_its_three_header_rows(tmp_path):
    path = tmp_path / "y.csv"
    path.write_text("Price,Close\nTicker,X\nDate,\n2020-01-01,1\n2020-01-02,oops\n")
    with pytest.raises(DataError, match="line 5: Close is not a number"):
        load_prices(path)


def test_fetch_saves_yfinance_csv_that_loads_back_and_is_reused(tmp_path, monkeypatch):
    walk = random_walk(100)
    calls = []

    def fake_download(tickers, **kwargs):
        calls.append((tickers, kwargs["start"], kwargs["end"]))
        return yfinance_frame(tickers, walk)

    monkeypatch.setattr(yf, "download", fake_download)
    path = fetch("PETR4.SA", "2020-01-01", "2021-01-01", tmp_path / "cache")
    assert path.read_text().splitlines()[:3] == [
        "Price,Close,High,Low,Open,Volume", "Ticker,PETR4.SA,PETR4.SA,PETR4.SA,PETR4.SA,PETR4.SA",
        "Date,,,,,"]
    np.testing.assert_allclose(load_prices(path)["close"], walk["close"], rtol=1e-12)
    assert fetch("PETR4.SA", "2020-01-01", "2021-01-01", tmp_path / "cache") == path
    assert calls == [("PETR4.SA", "2020-01-01", "2021-01-01")]  # the second call hit the cache


@pytest.mark.parametrize("failure", ["empty", "network"])
def test_auto_falls_back_to_the_snapshot_in_one_line(tmp_path, monkeypatch, capsys, failure):
    def fake_download(tickers, **kwargs):
        if failure == "network":
            raise ConnectionError("Could not resolve host: query2.finance.yahoo.com")
        return yfinance_frame(tickers, random_walk(0))  # yfinance's empty answer

    monkeypatch.setattr(yf, "download", fake_download)
    snapshot = write_flat_csv(tmp_path / "snap.csv", random_walk(50, start="2021-03-01"))
    path = resolve("auto", "PETR4.SA", "2020-01-01", "2022-01-01", tmp_path / "cache", snapshot)
    assert path == snapshot
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert str(snapshot) in out and "2021-03-01" in out and "yfinance unavailable" in out
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(DataError, match="could not download PETR4.SA"):
        resolve("yfinance", "PETR4.SA", "2020-01-01", "2022-01-01", tmp_path / "cache", snapshot)


def test_csv_source_never_calls_yfinance(tmp_path, monkeypatch):
    monkeypatch.setattr(yf, "download", lambda *a, **k: pytest.fail("yfinance was called"))
    snapshot = write_flat_csv(tmp_path / "s.csv", random_walk(10))
    assert resolve("csv", "X", "2020-01-01", "2021-01-01", tmp_path, snapshot) == snapshot
    with pytest.raises(DataError, match="data.source must be"):
        resolve("web", "X", "2020-01-01", "2021-01-01", tmp_path, snapshot)


def daily_csv(path: Path, dates: list[str], closes: list[float] | None = None,
              header: str = "Date,Close") -> Path:
    closes = closes or [10 + 0.1 * i for i in range(len(dates))]
    path.write_text(header + "\n" + "".join(f"{d},{c}\n" for d, c in zip(dates, closes, strict=True)))
    return path


def test_iso_and_timezone_aware_dates_load_as_trading_days(tmp_path):
    # older yfinance wrote local midnight with the offset; B3 switched -02:00/-03:00 with DST
    dates = ["2018-12-28 00:00:00-02:00", "2019-01-02 00:00:00-02:00", "2019-03-01T00:00:00-03:00",
             "2019-03-05 00:00:00-0300", "2019-03-06 00:00:00Z", "2019-03-07", "2019-03-08 00:00"]
    frame = load_prices(daily_csv(tmp_path / "tz.csv", dates))
    assert list(frame.index.strftime("%Y-%m-%d")) == [d[:10] for d in dates]
    assert frame.index.tz is None


@pytest.mark.parametrize(
    ("dates", "line", "why"),
    [
        # each alone parses either way: pandas' format="mixed" read 13/04 as day-first and
        # 03/04 as month-first, silently scrambling the series
        (["02/04/2020", "03/04/2020", "13/04/2020"], 2, "day-first and month-first"),
        (["2020-04-02", "2020-04-03", "13/04/2020"], 4, "day-first and month-first"),
        (["2020-04-02", "04/03/2020"], 3, "day-first and month-first"),
        (["02/04/20", "03/04/20"], 2, "a two-digit year"),
        (["20-04-02", "20-04-03"], 2, "a two-digit year"),
        (["2020-4-2", "2020-4-3"], 2, "is not YYYY-MM-DD;"),
    ],
)
def test_ambiguous_or_mixed_date_formats_stop_at_their_line(tmp_path, dates, line, why):
    path = daily_csv(tmp_path / "dates.csv", dates)
    with pytest.raises(DataError) as err:
        load_prices(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line {line}: date ") and why in message
    assert "\n" not in message


def test_an_impossible_calendar_date_names_its_line(tmp_path):
    path = daily_csv(tmp_path / "d.csv", ["2020-02-28", "2020-02-30"])
    with pytest.raises(DataError, match=r"line 3: date is not a date \('2020-02-30'\)"):
        load_prices(path)


def test_a_folder_or_unreadable_file_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_prices(tmp_path)
    assert str(err.value) == f"{tmp_path}: is a folder, not a CSV file"
    path = write_flat_csv(tmp_path / "locked.csv", random_walk(5))

    def denied(self, *args, **kwargs):  # chmod 000 does not stop root, who runs CI here
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(DataError) as err:
        load_prices(path)
    assert str(err.value) == f"{path}: cannot read the file (Permission denied)"


def test_adj_close_all_null_falls_back_to_close(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("Date,Open,High,Low,Close,Adj Close,Volume\n"
                    "2020-01-02,1,1,1,10.0,null,5\n2020-01-03,1,1,1,10.5,null,5\n")
    assert load_prices(path)["close"].tolist() == [10.0, 10.5]


@pytest.mark.parametrize("name", ["PETR4.SA.csv", "VALE3.SA.csv", "ITUB4.SA.csv"])
def test_bundled_snapshots_raise_no_alarm(caplog, name):
    caplog.set_level(logging.DEBUG)
    load_prices(ROOT / "data" / name, on_suspicious="error")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def vale3_with(tmp_path: Path, change) -> Path:
    """The bundled VALE3 series (real moves, real crashes) with one defect made by `change`."""
    frame = load_prices(ROOT / "data" / "VALE3.SA.csv")
    return write_flat_csv(tmp_path / "VALE3.SA.csv", change(frame.copy()))


def unadjusted_split(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[:"2015-06-30", "close"] *= 2  # a 2:1 split on 2015-07-01 the provider never adjusted
    return frame


def typo(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc["2019-01-28", "close"] *= 1000  # the day of VALE3's real -24% crash (Brumadinho)
    return frame


def typo_x15(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc["2022-02-07", "close"] *= 1.5  # a small typo: it flipped the val verdict unseen
    return frame


@pytest.mark.parametrize(
    ("change", "named"),
    [(unadjusted_split, "2015-07-01 close x0.50 vs the day before, and it stays (an unadjusted split?)"),
     (typo, "2019-01-28 close 22893.1 is 865x its neighbours"),
     (typo_x15, "2022-02-07 close 91.9")],
)
def test_suspicious_moves_warn_naming_the_date_or_stop_when_asked(tmp_path, caplog, change, named):
    path = vale3_with(tmp_path, change)
    frame = load_prices(path)
    assert len(frame) == len(load_prices(ROOT / "data" / "VALE3.SA.csv"))  # warned, not altered
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert record.getMessage().startswith(f"warning: {path}: suspicious data: ")
    assert named in record.getMessage()
    with pytest.raises(DataError, match="suspicious data: .*" + named.split(" ")[0]):
        load_prices(path, on_suspicious="error")


def test_tickers_that_are_paths_are_refused_and_names_follow_tickers():
    for bad in ["../x", "a/b", "..", "a\\b", "", "PETR4.SA/../../etc"]:
        with pytest.raises(DataError, match="is not a ticker symbol"):
            check_ticker(bad)
    assert check_ticker("PETR4.SA") == "PETR4.SA" and check_ticker("^BVSP") == "^BVSP"
    names = {t: ticker_name(t) for t in ["PETR4.SA", "VALE3.SA", "^BVSP", "BTC-USD", "AAPL"]}
    assert names == {"PETR4.SA": "petr4", "VALE3.SA": "vale3", "^BVSP": "bvsp", "BTC-USD": "btc-usd",
                     "AAPL": "aapl"}
