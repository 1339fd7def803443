"""Forecast the next closes of tickers from the running TorchServe:
python -m stockcast.forecast PETR4.SA VALE3.SA [--json] [--csv FILE] [--home logs/serve]

Each ticker's latest closes come from yfinance, else its newest file in data/cache, else the
bundled data/<TICKER>.csv (--csv: your own file instead); the last `window` of them go to the model
serving that ticker. Exit 1 if any ticker failed (the others still print), each failure in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import pandas as pd

from stockcast.prices import DataError, check_ticker, latest_closes, load_prices, ticker_name
from stockcast.serve import Server, running

ROOT = Path(__file__).resolve().parents[2]  # the checkout: data/ and logs/ are found from any cwd
HOME = ROOT / "logs" / "serve"
LEVELS = (0.8, 0.95)
STALE_DAYS = 4  # a weekend and a holiday: older closes get a note that the forecast is not for tomorrow


class Failed(Exception):
    """One ticker that cannot be forecast; the message is the one line the user sees."""


def next_weekdays(last: date, horizon: int) -> list[date]:
    """The `horizon` weekdays after `last`: B3's holidays are not known, so a holiday counts."""
    return [d.date() for d in pd.bdate_range(pd.Timestamp(last) + pd.Timedelta(days=1), periods=horizon)]


def model_for(ticker: str, record: dict) -> tuple[str, dict]:
    """(name, record entry) of the served model of `ticker`, matched regardless of case."""
    models = record.get("models") or {}
    for name, model in models.items():
        if str(model.get("ticker", "")).upper() == ticker.upper():
            return name, model
    serving = ", ".join(f"{n} ({m.get('ticker', '?')})" for n, m in models.items()) or "nothing"
    near = [m["ticker"] for m in models.values()
            if str(m.get("ticker", "")).upper().startswith(f"{ticker.upper()}.")]
    if near:  # PETR4 for PETR4.SA: Yahoo's symbols carry the exchange
        raise Failed(f"{ticker} is not served; did you mean {' or '.join(near)}? (serving: {serving})")
    name = ticker_name(ticker)
    how = f"make train EXPERIMENT={name}" if (ROOT / "configs" / "experiment" / f"{name}.yaml").exists() \
        else f"python train.py data.ticker={ticker} (prices from yfinance)"
    raise Failed(f"{ticker} is not served (serving: {serving}); to add it: {how} then make serve "
                 "(no restart needed)")


def ask(server: Server, name: str, history: list[float]) -> dict:
    """POST `history` to /predictions/`name` with the server's key; the answer, or Failed."""
    request = urllib.request.Request(
        f"{server.inference}/predictions/{name}", data=json.dumps({"history": history}).encode(),
        headers={"Content-Type": "application/json", **server.headers()}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            body = json.loads(body)["message"]
        except (ValueError, KeyError, TypeError):
            pass
        why = " ".join(str(body).split()) or err.reason  # one line; a 413 comes with no body
        raise Failed(f"the server refused the closes ({err.code}): {why}") from None
    except (OSError, ValueError) as err:  # refused, reset, timed out, or not JSON
        raise Failed(f"no forecast from {server.inference} ({getattr(err, 'reason', err)})") from None


def forecast(ticker: str, server: Server, record: dict, csv: Path | None = None) -> dict:
    """One ticker's forecast: its latest closes sent to the model serving it."""
    try:
        ticker = check_ticker(ticker).upper()
    except DataError:
        raise Failed(f"{ticker!r} is not a ticker symbol like PETR4.SA (letters, digits and . ^ = _ - "
                     "only)") from None
    name, model = model_for(ticker, record)
    if csv is None:
        frame, source = latest_closes(ticker, ROOT / "data" / "cache", ROOT / "data" / f"{ticker}.csv")
        source = source.replace(f"{ROOT}/", "")  # the checkout's files by their usual names
    else:
        frame = load_prices(csv)
        source = f"file {csv}, last close {frame.index[-1]:%Y-%m-%d}"
    answer = ask(server, name, frame["close"].tolist()[-int(model["window"]):])
    intervals = {i["level"]: i for i in answer.get("intervals", [])}
    return {"ticker": ticker, "source": source, "last_date": f"{frame.index[-1]:%Y-%m-%d}",
            "last_close": float(frame["close"].iloc[-1]),
            "dates": [d.isoformat() for d in next_weekdays(frame.index[-1], len(answer["forecast"]))],
            "forecast": answer["forecast"], "intervals": [intervals[k] for k in LEVELS if k in intervals],
            "model": answer["model"]}


def table(results: list[dict]) -> str:
    """An aligned table: one row per forecast date, the ticker's facts on its first row."""
    def span(result: dict, level: float, step: int) -> str:
        found = [i for i in result["intervals"] if i["level"] == level]
        return f"{found[0]['lower'][step]:.2f} .. {found[0]['upper'][step]:.2f}" if found else "-"

    rows = [("ticker", "for (next weekday)", "forecast", "80% interval", "95% interval", "last close",
             "model", "source")]
    for r in results:
        for step, day in enumerate(r["dates"]):
            first = step == 0
            rows.append((r["ticker"] if first else "", f"{date.fromisoformat(day):%a %Y-%m-%d}",
                         f"{r['forecast'][step]:.2f}", span(r, 0.8, step), span(r, 0.95, step),
                         f"{r['last_close']:.2f} on {r['last_date']}" if first else "",
                         f"{r['model']['name']} v{r['model']['version']}" if first else "",
                         r["source"] if first else ""))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    right = {2}  # numbers right-aligned
    return "\n".join("  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                               for c, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in rows)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 1, like every other failure here
        sys.exit(f"error: {message} (python -m stockcast.forecast --help)")


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m stockcast.forecast", description=__doc__.split("\n\n")[1])
    parser.add_argument("tickers", nargs="+", metavar="TICKER", help="Yahoo symbols: PETR4.SA VALE3.SA")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    parser.add_argument("--csv", type=Path, metavar="FILE",
                        help="your own prices of the one TICKER (any Yahoo CSV shape)")
    parser.add_argument("--home", type=Path, default=HOME, help="the server's folder (default: logs/serve)")
    args = parser.parse_args(argv)
    if args.csv and len(args.tickers) != 1:
        parser.error(f"--csv holds one ticker's prices: give exactly one TICKER, not {len(args.tickers)}")
    server, record = running(args.home)
    if server is None:
        shown = "logs/serve" if args.home == HOME else args.home
        sys.exit(f"error: no TorchServe is running in {shown}: start it with make serve")
    results, failed = [], False
    for ticker in args.tickers:
        try:
            results.append(forecast(ticker, server, record, args.csv))
            age = (date.today() - date.fromisoformat(results[-1]["last_date"])).days
            if age > STALE_DAYS:
                print(f"note: {results[-1]['ticker']}: the newest close found is {age} days old "
                      f"({results[-1]['last_date']}): the forecast is for the weekday after it, not for "
                      "tomorrow", file=sys.stderr)
        except (Failed, DataError) as err:
            print(f"error: {ticker}: {err}", file=sys.stderr)
            failed = True
    if args.json:
        print(json.dumps(results, indent=1))
    elif results:
        print(table(results))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
