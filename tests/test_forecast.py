"""The forecast client: where the latest closes come from, the dates it forecasts, its one-line
errors, and (slow) the whole client against a real TorchServe serving two tickers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from conftest import ROOT, random_walk, write_flat_csv
from helpers import post

from stockcast.forecast import Failed, ask, model_for, next_weekdays
from stockcast.prices import DataError, latest_closes
from stockcast.serve import Server, free_ports

TODAY = date(2025, 1, 10)  # a Friday
RECORD = {"models": {"lstm": {"ticker": "PETR4.SA", "version": "4", "window": 60, "horizon": 1},
                     "vale3": {"ticker": "VALE3.SA", "version": "2", "window": 60, "horizon": 1}}}


def client(*args: str, cwd: Path = Path("/")) -> subprocess.CompletedProcess:
    """The client as a user runs it, from a folder that is not the checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "stockcast.forecast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def one_line(run: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run (a note on old closes, about another ticker, aside)."""
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]



def test_latest_closes_downloads_the_last_year_up_to_tomorrow(tmp_path, yahoo):
    yahoo.frame = random_walk(260, start="2024-01-15")
    snapshot = write_flat_csv(tmp_path / "snap.csv", random_walk(80, start="2024-06-03"))
    frame, source = latest_closes("PETR4.SA", tmp_path / "cache", snapshot, today=TODAY)
    assert yahoo.calls == [("PETR4.SA", "2024-01-06", "2025-01-11")]
    assert frame["close"].tolist() == pytest.approx(yahoo.frame["close"].tolist(), rel=1e-12)
    assert source == f"yfinance, last close {yahoo.frame.index[-1]:%Y-%m-%d}"
    # asked again the same day, fetch reuses that file: said as it is, not as a new download
    assert latest_closes("PETR4.SA", tmp_path / "cache", snapshot, today=TODAY)[1] == (
        f"cache {tmp_path / 'cache' / 'PETR4.SA_2024-01-06_2025-01-11.csv'}, last close "
        f"{yahoo.frame.index[-1]:%Y-%m-%d}")


def test_without_yfinance_the_cache_file_that_ends_latest_then_the_snapshot(tmp_path, yahoo):
    cache = tmp_path / "cache"
    cache.mkdir()
    snapshot = write_flat_csv(tmp_path / "snap.csv", random_walk(80, start="2021-03-01"))
    frame, source = latest_closes("PETR4.SA", cache, snapshot, today=TODAY)
    assert source == f"snapshot {snapshot}, last close {frame.index[-1]:%Y-%m-%d}"
    assert frame.index[-1] == random_walk(80, start="2021-03-01").index[-1]
    # the newest by its last date, not by its name or when it was written; other tickers ignored
    newest = cache / "PETR4.SA_2015-01-01_2023-12-31.csv"
    write_flat_csv(newest, random_walk(100, start="2023-06-01"))
    write_flat_csv(cache / "PETR4.SA_2024-01-01_2024-06-01.csv", random_walk(50, start="2023-01-02"))
    write_flat_csv(cache / "PETR4.SA_X_2024-01-01_2025-01-01.csv", random_walk(300, start="2024-01-01"))
    write_flat_csv(cache / "VALE3.SA_2024-01-01_2025-01-01.csv", random_walk(300, start="2024-01-01"))
    (cache / "PETR4.SA_2024-06-01_2025-01-01.csv").write_text("not,a\nprice,file\n")  # skipped
    frame, source = latest_closes("PETR4.SA", cache, snapshot, today=TODAY)
    last = random_walk(100, start="2023-06-01").index[-1]
    assert source == f"cache {newest}, last close {last:%Y-%m-%d}" and frame.index[-1] == last
    assert len(yahoo.calls) == 2  # yfinance was asked first both times
    # a snapshot newer than every cache file wins over them; the refreshed file over both
    newer = write_flat_csv(tmp_path / "newer.csv", random_walk(80, start="2024-06-03"))
    frame, source = latest_closes("PETR4.SA", cache, newer, today=TODAY)
    assert source.startswith(f"snapshot {newer}, ")
    assert frame.index[-1] == random_walk(80, start="2024-06-03").index[-1]
    live = write_flat_csv(cache / "PETR4.SA.csv", random_walk(120, start="2024-06-03"))
    frame, source = latest_closes("PETR4.SA", cache, newer, today=TODAY)
    assert source.startswith(f"cache {live}, ") and len(frame) == 120


def test_no_prices_anywhere_is_one_data_error(tmp_path, yahoo):
    with pytest.raises(DataError, match=r"no prices for PETR4.SA: yfinance failed \(yfinance returned no"):
        latest_closes("PETR4.SA", tmp_path / "cache", tmp_path / "PETR4.SA.csv", today=TODAY)
    with pytest.raises(DataError, match="is not a ticker symbol"):
        latest_closes("../etc/passwd", tmp_path / "cache", tmp_path / "x.csv", today=TODAY)


@pytest.mark.parametrize(("last", "horizon", "days"), [
    (date(2025, 1, 10), 1, ["2025-01-13"]),  # Friday -> Monday
    (date(2025, 1, 9), 3, ["2025-01-10", "2025-01-13", "2025-01-14"]),
    (date(2025, 1, 11), 1, ["2025-01-13"]),  # a Saturday close (a crypto pair): still a weekday
    (date(2024, 12, 24), 2, ["2024-12-25", "2024-12-26"]),  # holidays are not known: counted
])
def test_the_forecast_dates_are_the_next_weekdays(last, horizon, days):
    assert [d.isoformat() for d in next_weekdays(last, horizon)] == days


def test_the_model_is_found_by_ticker_in_any_case_and_an_unserved_one_says_how_to_add_it():
    assert model_for("vale3.sa", RECORD)[0] == "vale3" and model_for("PETR4.SA", RECORD)[0] == "lstm"
    with pytest.raises(Failed) as err:
        model_for("ITUB4.SA", RECORD)
    assert str(err.value) == ("ITUB4.SA is not served (serving: lstm (PETR4.SA), vale3 (VALE3.SA)); to "
                              "add it: make train EXPERIMENT=itub4 then make serve (no restart needed)")
    with pytest.raises(Failed, match=r"petr4 is not served; did you mean PETR4.SA\? \(serving: lstm"):
        model_for("petr4", RECORD)  # Yahoo's symbol without its exchange
    with pytest.raises(Failed, match=r"to add it: python train.py data.ticker=XPTO3.SA \(prices from"):
        model_for("XPTO3.SA", RECORD)  # no configs/experiment/xpto3.yaml: no EXPERIMENT to name


def test_a_refused_connection_is_one_failure(tmp_path):
    server = Server(tmp_path, pid=0, ports=free_ports())  # nothing listens there
    with pytest.raises(Failed, match=rf"no forecast from {server.inference} \(.*Connection refused"):
        ask(server, "lstm", [30.0] * 60)


@pytest.mark.parametrize(("args", "message"), [
    (["PETR4.SA", "VALE3.SA", "--csv", "x.csv"],
     "--csv holds one ticker's prices: give exactly one TICKER, not 2"),
    ([], "the following arguments are required: TICKER"),
    (["PETR4.SA", "--days", "3"], "unrecognized arguments: --days 3"),
])
def test_argument_errors_are_one_line(args, message):
    assert one_line(client(*args)) == f"error: {message} (python -m stockcast.forecast --help)"


def test_no_server_is_one_line(tmp_path):
    run = client("PETR4.SA", "--home", str(tmp_path))
    assert one_line(run) == f"error: no TorchServe is running in {tmp_path}: start it with make serve"
    assert run.stdout == ""


# ---- against a real TorchServe serving lstm (PETR4.SA) and vale3 (VALE3.SA) ----------------------

@pytest.fixture(scope="module")
def two_tickers(mar, artifacts, tmp_path_factory):
    """A TorchServe started by `serve start` with lstm.mar and vale3.mar; its home."""
    from test_lifecycle import as_ticker, serve

    from stockcast.package import OTHER_TICKERS, build_archive

    tmp = tmp_path_factory.mktemp("forecast")
    store, home = tmp / "store", tmp / "home"
    store.mkdir()
    (store / "lstm.mar").write_bytes(mar.read_bytes())
    build_archive(as_ticker(artifacts, tmp / "vale3", "VALE3.SA"), store, handlers=ROOT / "handlers",
                  overrides=OTHER_TICKERS, name="vale3")
    try:
        started = serve("start", "--model-store", str(store), "--home", str(home),
                        "--ports", *map(str, free_ports()))
        assert started.returncode == 0, started.stderr
        yield home
    finally:
        serve("stop", "--home", str(home))


@pytest.mark.slow
def test_both_tickers_print_and_json_matches_a_direct_post(two_tickers):
    from stockcast.serve import running

    human = client("PETR4.SA", "vale3.sa", "--home", str(two_tickers))
    machine = client("PETR4.SA", "VALE3.SA", "--home", str(two_tickers), "--json")
    assert human.returncode == 0 and machine.returncode == 0, human.stderr + machine.stderr
    print(human.stdout)
    # the bundled closes end 2024-12-30: said, since the forecast is not for tomorrow
    assert [line.split(" days old")[0].split(" is ")[0] for line in human.stderr.splitlines()] == [
        "note: PETR4.SA: the newest close found", "note: VALE3.SA: the newest close found"], human.stderr
    results = json.loads(machine.stdout)
    assert [r["ticker"] for r in results] == ["PETR4.SA", "VALE3.SA"]
    assert [(r["model"]["name"], r["model"]["ticker"]) for r in results] == [
        ("lstm", "PETR4.SA"), ("vale3", "VALE3.SA")]
    server, record = running(two_tickers)
    rows = {line.split()[0]: line for line in human.stdout.splitlines()[1:]}
    for r in results:
        ticker = r["ticker"]
        frame, source = latest_closes(ticker, ROOT / "data" / "cache", ROOT / "data" / f"{ticker}.csv")
        assert r["last_date"] == f"{frame.index[-1]:%Y-%m-%d}" and r["last_close"] == frame["close"].iloc[-1]
        assert r["source"].split(",")[-1] == source.split(",")[-1] == f" last close {r['last_date']}"
        assert r["dates"] == [next_weekdays(frame.index[-1], 1)[0].isoformat()]
        window = record["models"][r["model"]["name"]]["window"]
        status, direct = post(f"{server.inference}/predictions/{r['model']['name']}",
                              json.dumps({"history": frame["close"].tolist()[-window:]}),
                              headers=server.headers())
        assert status == 200 and r["forecast"] == direct["forecast"] and r["model"] == direct["model"]
        assert [i["level"] for i in r["intervals"]] == [0.8, 0.95] and r["intervals"] == direct["intervals"]
        # the human row: the same date and numbers, the last close, the model and the source
        day = date.fromisoformat(r["dates"][0])
        low80, high80 = r["intervals"][0]["lower"][0], r["intervals"][0]["upper"][0]
        low95, high95 = r["intervals"][1]["lower"][0], r["intervals"][1]["upper"][0]
        for text in (f"{day:%a %Y-%m-%d}", f"{r['forecast'][0]:.2f}", f"{low80:.2f} .. {high80:.2f}",
                     f"{low95:.2f} .. {high95:.2f}", f"{r['last_close']:.2f} on {r['last_date']}",
                     f"{r['model']['name']} v{r['model']['version']}", r["source"]):
            assert text in rows[r["ticker"]], (text, rows[r["ticker"]])


@pytest.mark.slow
def test_an_unserved_ticker_fails_in_one_line_and_the_served_one_still_prints(two_tickers):
    run = client("ITUB4.SA", "PETR4.SA", "--home", str(two_tickers))
    error = one_line(run)
    assert error.startswith("error: ITUB4.SA: ITUB4.SA is not served (serving: lstm (PETR4.SA), "
                            "vale3 (VALE3.SA)); to add it: make train EXPERIMENT=itub4 then make serve")
    assert [line.split()[0] for line in run.stdout.splitlines()[1:]] == ["PETR4.SA"]


@pytest.mark.slow
def test_own_csv_is_used_and_its_errors_are_one_line(two_tickers, tmp_path):
    prices = random_walk(80, start="2024-09-02")
    good = write_flat_csv(tmp_path / "mine.csv", prices)
    run = client("VALE3.SA", "--csv", str(good), "--home", str(two_tickers), "--json")
    assert run.returncode == 0, run.stderr
    [result] = json.loads(run.stdout)
    assert result["source"] == f"file {good}, last close {prices.index[-1]:%Y-%m-%d}"
    assert result["last_close"] == pytest.approx(prices["close"].iloc[-1])
    assert result["model"]["name"] == "vale3"

    lines = good.read_text().splitlines()
    assert lines[0] == "Date,Open,High,Low,Close,Volume"
    lines[42] = ",".join([*lines[42].split(",")[:4], "oops", "1000"])  # file line 43
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    error = one_line(client("VALE3.SA", "--csv", str(bad), "--home", str(two_tickers)))
    assert error == f"error: VALE3.SA: {bad}, line 43: Close is not a number ('oops')"

    short = write_flat_csv(tmp_path / "short.csv", prices.head(30))  # the server says why not
    error = one_line(client("VALE3.SA", "--csv", str(short), "--home", str(two_tickers)))
    assert error.startswith("error: VALE3.SA: the server refused the closes (400): ") and "60" in error
