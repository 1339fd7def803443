"""make refresh: new closes appended to the refreshed file (yfinance faked as it answers, or files
dropped into data/incoming/), the snapshot never written; and (slow) a replay of trading days held
back from the bundled data: each day's refresh ingests its close, retrains, the gate promotes or
refuses, and the served version follows, swapped in under load without a failed request."""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FORCE, NO_BACKTEST, QUICK, ROOT, compose_train, random_walk, write_flat_csv
from helpers import ORIGINAL, post

from stockcast.prices import DataError, load_prices
from stockcast.refresh import fetch_new, refresh, serving_history

TODAY = date(2025, 3, 14)


def configured(tmp_path: Path, snapshot: Path, *overrides: str):
    return compose_train(tmp_path, f"data.snapshot={snapshot}", f"data.cache_dir={tmp_path / 'cache'}",
                         f"refresh.incoming={tmp_path / 'incoming'}", f"refresh.log_dir={tmp_path / 'log'}",
                         f"refresh.model_store={tmp_path / 'store'}",
                         f"refresh.serve_home={tmp_path / 'home'}", *overrides)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_yfinance_closes_are_appended_and_a_new_adjustment_rescales_the_past(tmp_path, yahoo):
    walk = random_walk(300, start="2024-01-01")
    snapshot = write_flat_csv(tmp_path / "snap.csv", walk.iloc[:290])
    before = digest(snapshot)
    cfg = configured(tmp_path, snapshot)
    # yfinance's prices after a dividend: every close, old ones too, 2% lower than the snapshot's
    yahoo.frame = walk.iloc[283:] * 0.98
    done = fetch_new(cfg, TODAY)
    assert (done["added"], done["through"]) == (10, f"{walk.index[-1]:%Y-%m-%d}")
    assert done["factor"] == pytest.approx(0.98, rel=1e-9) and done["source"] == "yfinance"
    start = (walk.index[289] - pd.Timedelta(days=10)).strftime("%Y-%m-%d")
    assert yahoo.calls == [("PETR4.SA", start, "2025-03-15")]  # from 10 days before the last close
    live = load_prices(tmp_path / "cache" / "PETR4.SA.csv")
    # one series, consistently adjusted: no fake return at the junction
    np.testing.assert_allclose(live["close"], walk["close"] * 0.98, rtol=1e-9)
    assert digest(snapshot) == before
    # asked again with nothing new: nothing added, nothing rescaled
    assert (fetch_new(cfg, TODAY)["added"], fetch_new(cfg, TODAY)["factor"]) == (0, pytest.approx(1.0))


def test_a_revised_close_is_refused_naming_its_date_and_nothing_is_written(tmp_path, yahoo):
    walk = random_walk(300, start="2024-01-01")
    cfg = configured(tmp_path, write_flat_csv(tmp_path / "snap.csv", walk.iloc[:290]))
    revised = walk.iloc[283:].copy()
    revised.iloc[3, 0] *= 1.05  # a close the provider changed after the fact
    yahoo.frame = revised
    with pytest.raises(DataError, match=f"the close of {walk.index[286]:%Y-%m-%d} .* a revised price"):
        fetch_new(cfg, TODAY)
    assert len(load_prices(tmp_path / "cache" / "PETR4.SA.csv")) == 290


def test_offline_the_dropped_files_are_appended_then_moved_and_a_bad_one_stops_at_its_line(tmp_path, yahoo):
    walk = random_walk(300, start="2024-01-01")
    cfg = configured(tmp_path, write_flat_csv(tmp_path / "snap.csv", walk.iloc[:290]))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_flat_csv(incoming / "PETR4.SA-1.csv", walk.iloc[288:295])  # overlaps what is kept
    write_flat_csv(incoming / "VALE3.SA.csv", random_walk(5, start="2025-01-01"))  # another ticker's
    done = fetch_new(cfg, TODAY)  # yfinance answers nothing (offline)
    assert done["added"] == 5 and "PETR4.SA-1.csv" in done["source"] and done["factor"] == pytest.approx(1)
    assert sorted(p.name for p in incoming.iterdir()) == ["VALE3.SA.csv", "done"]
    assert [p.name.split("-", 1)[1] for p in (incoming / "done").iterdir()] == ["PETR4.SA-1.csv"]
    bad = write_flat_csv(incoming / "PETR4.SA-2.csv", walk.iloc[295:])
    lines = bad.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 2)[0] + ",oops,1000"  # file line 4: its Close
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"PETR4.SA-2.csv, line 4: Close is not a number \('oops'\)"):
        fetch_new(cfg, TODAY)
    assert bad.exists() and len(load_prices(tmp_path / "cache" / "PETR4.SA.csv")) == 295


def test_the_serving_history_starts_with_the_first_champion_and_follows_the_swaps():
    lines = [{"through": "2025-01-02", "serving": "1"}, {"through": "2025-01-03", "serving": "2"},
             {"through": "2025-01-06", "serving": "2"}, {"through": "2025-01-07", "serving": None},
             {"through": "2025-01-08", "serving": "1"}]
    assert serving_history(lines, ("1", "2024-12-30")) == [("1", "2024-12-30"), ("2", "2025-01-03"),
                                                           ("1", "2025-01-08")]


@pytest.mark.slow
def test_a_replay_of_held_back_days_promotes_refuses_swaps_under_load_and_pushes_scores(tmp_path):
    """Three trading days held back from the bundled PETR4 closes, dropped in one a day: day 1's
    candidate is refused (no walk-forward evidence; run again with no new close, nothing is
    retrained), days 2 and 3's forced through the gate; the server follows (day 3's swap while two
    clients forecast, none failing), and each refresh pushes the served forecasts' scores to a real
    Pushgateway."""
    from helpers import binary, running
    from test_lifecycle import answering

    from stockcast.serve import free_ports, get, start, stop

    real = load_prices(ROOT / "data" / "PETR4.SA.csv")
    snapshot = write_flat_csv(tmp_path / "snap.csv", real.iloc[:-3])
    quick = [o for o in QUICK if o != FORCE]
    records, server, loads = [], None, []
    (port,) = free_ports(1)
    # its own persistence file: Debian's build defaults to one shared /var/lib/prometheus/pushgateway.data
    gateway_command = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
                       f"--persistence.file={tmp_path / 'pushgateway.data'}"]
    with running(gateway_command, f"http://127.0.0.1:{port}", "/-/ready") as gateway:
        try:
            # (the held-back close dropped in, the gate): day 0 trains the first champion
            steps = [(None, FORCE), (-3, NO_BACKTEST), (None, NO_BACKTEST), (-2, FORCE), (-1, FORCE)]
            for day, (row, gate) in enumerate(steps):
                if row is not None:
                    (tmp_path / "incoming").mkdir(exist_ok=True)
                    write_flat_csv(tmp_path / "incoming" / f"PETR4.SA-{day}.csv", real.iloc[[row]])
                cfg = configured(tmp_path / f"day{day}", snapshot, *quick, gate,
                                 f"refresh.pushgateway={gateway}")
                for key in ("data.cache_dir", "refresh.incoming", "refresh.log_dir", "refresh.model_store",
                            "refresh.serve_home"):  # one project across the days; a run folder per day
                    section, leaf = key.split(".")
                    cfg[section][leaf] = str(tmp_path / leaf)
                cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
                if day == len(steps) - 1:  # during this day's swap, two clients keep forecasting
                    loads = [answering(f"{server.inference}/predictions/lstm", server.token(), 15)
                             for _ in range(2)]
                records.append(refresh(cfg))
                if day == 0:
                    server = start(tmp_path / "model_store", tmp_path / "serve_home",
                                   handlers=ROOT / "handlers", ports=free_ports())
            for _, thread in loads:
                thread.join()
            served = post(server, json.dumps(ORIGINAL))[1]["model"]["version"]
        finally:
            if server:
                stop(server)
        pushed = get(f"{gateway}/metrics")[1]
    answered = [s for statuses, _ in loads for s in statuses]
    assert len(answered) > 50 and set(answered) == {200}, answered
    assert [r["through"] for r in records] == [f"{d:%Y-%m-%d}" for d in real.index[[-4, -3, -3, -2, -1]]]
    assert [r["new_closes"] for r in records] == [0, 1, 0, 1, 1]
    trained = [r["trained"] for r in records]
    assert trained[2] is None  # the refused candidate's closes: nothing new to train on
    assert [r["promoted"] for r in records] == [True, False, False, True, True]
    assert [r["serving"] for r in records] == [trained[0], trained[0], trained[0], trained[3], trained[4]]
    assert records[4]["swap"]["version"] == trained[4] and not records[4]["swap"]["restarted"]
    assert served == trained[4]
    lines = (tmp_path / "log_dir" / "petr4.jsonl").read_text().splitlines()
    assert [json.loads(line)["serving"] for line in lines] == [r["serving"] for r in records]
    # scored: the forecasts made at the closes of days 0, 1 (by version 1) and 2 (its successor)
    assert [r["quality"]["last_20"]["n"] for r in records] == [0, 1, 1, 2, 3]
    assert all(r["quality"]["pushed_to"] == gateway for r in records)
    last = records[4]["through"]
    assert (f'stockcast_served_version_info{{instance="",job="stockcast_refresh",since="{last}",'
            f'ticker="PETR4.SA",trained_through="{last}",version="{trained[4]}"}} 1') in pushed
    assert len(load_prices(snapshot)) == len(real) - 3  # the snapshot was never written
    print(f"swap under load: {records[4]['swap']['seconds']} s, {len(answered)} forecasts, all 200; "
          f"refresh seconds: {[r['seconds'] for r in records]}")


def test_a_second_refresh_of_the_same_experiment_stops_while_one_runs(tmp_path):
    import fcntl

    from stockcast.refresh import RefreshError

    cfg = configured(tmp_path, write_flat_csv(tmp_path / "snap.csv", random_walk(100)))
    (tmp_path / "log").mkdir()
    with open(tmp_path / "log" / ".petr4.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RefreshError, match="another refresh of petr4 is running"):
            refresh(cfg)
    assert not (tmp_path / "cache").exists()  # it stopped before fetching anything


def test_closes_that_do_not_fit_are_refused_naming_the_source_and_date_and_nothing_is_kept(tmp_path, yahoo):
    walk = random_walk(300, start="2024-01-01")
    snapshot = write_flat_csv(tmp_path / "snap.csv", walk.iloc[:290])
    cfg = configured(tmp_path, snapshot)
    live = tmp_path / "cache" / "PETR4.SA.csv"
    incoming = tmp_path / "incoming"
    incoming.mkdir()

    def refused(match: str) -> None:
        kept = live.read_bytes() if live.exists() else None
        with pytest.raises(DataError, match=match):
            fetch_new(cfg, TODAY)
        assert kept is None or live.read_bytes() == kept

    # another ticker's closes under this one's name: its overlapping close differs (no "factor")
    other = random_walk(12, start=f"{walk.index[289]:%Y-%m-%d}", seed=7) * 1.468
    write_flat_csv(incoming / "PETR4.SA-vale.csv", other)
    refused(f"PETR4.SA-vale.csv.*the close of {walk.index[289]:%Y-%m-%d} .* differs from the one kept")
    (incoming / "PETR4.SA-vale.csv").unlink()
    # yfinance: a factor no dividend explains
    yahoo.frame = walk.iloc[283:] * 1.468
    refused("yfinance: its close of .* is 1.468x the one kept: not a dividend adjustment")
    yahoo.frame = None
    # an unadjusted 2:1 split in the new closes, whatever data.on_suspicious says (warn here)
    split = walk.iloc[290:].copy()
    split.iloc[2:, 0] *= 0.5
    write_flat_csv(incoming / "PETR4.SA-split.csv", split)
    refused(r"PETR4.SA-split.csv\): .* close x0.5\d vs the day before, and it stays \(an unadjusted split")
    (incoming / "PETR4.SA-split.csv").unlink()
    # closes after a gap: the ones between are missing
    later = random_walk(3, start="2025-06-02") * (walk.close.iloc[289] / 20)
    write_flat_csv(incoming / "PETR4.SA.csv", later)
    refused(r"comes \d+ days after the one before it .*: closes are missing")
    (incoming / "PETR4.SA.csv").unlink()
    # two files that disagree on a day
    write_flat_csv(incoming / "PETR4.SA-a.csv", walk.iloc[290:293])
    write_flat_csv(incoming / "PETR4.SA-b.csv", walk.iloc[292:295] * 1.01)
    refused(f"PETR4.SA-a.csv and PETR4.SA-b.csv disagree on the close of {walk.index[292]:%Y-%m-%d}")
    assert sorted(p.name for p in incoming.iterdir()) == ["PETR4.SA-a.csv", "PETR4.SA-b.csv"]


def test_a_missing_day_is_filled_in_and_a_damaged_refreshed_file_is_refused(tmp_path, yahoo):
    walk = random_walk(300, start="2024-01-01")
    cfg = configured(tmp_path, write_flat_csv(tmp_path / "snap.csv", walk.drop(walk.index[280]).iloc[:289]))
    (tmp_path / "incoming").mkdir()
    write_flat_csv(tmp_path / "incoming" / "PETR4.SA-late.csv", walk.iloc[[280]])  # a day the snapshot lacks
    assert fetch_new(cfg, TODAY)["added"] == 1
    live = tmp_path / "cache" / "PETR4.SA.csv"
    assert len(load_prices(live)) == 290 and walk.index[280] in load_prices(live).index
    live.write_text("\n".join(live.read_text().splitlines()[:100]) + "\n")  # cut short
    with pytest.raises(DataError, match="PETR4.SA.csv ends .* fewer than the snapshot .*: damaged"):
        fetch_new(cfg, TODAY)


def test_a_record_cut_short_is_skipped_with_a_warning(tmp_path, caplog):
    from stockcast.refresh import read_log

    log = tmp_path / "petr4.jsonl"
    log.write_text('{"through": "2025-01-02", "serving": "1"}\n{"through": "2025-01-0\n')
    assert read_log(log) == [{"through": "2025-01-02", "serving": "1"}]
    assert f"{log}, line 2: not a record" in caplog.text


def test_a_version_whose_files_are_gone_leaves_its_days_unscored_not_anothers(tmp_path, artifacts,
                                                                              monkeypatch):
    import stockcast.refresh as refresh_module

    real = load_prices(ROOT / "data" / "PETR4.SA.csv")
    cfg = configured(tmp_path, write_flat_csv(tmp_path / "snap.csv", real))
    (tmp_path / "cache").mkdir()
    write_flat_csv(tmp_path / "cache" / "PETR4.SA.csv", real)

    def folder(cfg, name, version):
        if version == "2":
            raise RuntimeError("RESOURCE_DOES_NOT_EXIST: version 2")
        return artifacts

    monkeypatch.setattr(refresh_module, "version_folder", folder)
    days = real.index
    out = refresh_module.score(cfg, "petr4", [("1", f"{days[-40]:%Y-%m-%d}"), ("2", f"{days[-30]:%Y-%m-%d}"),
                                               ("3", f"{days[-10]:%Y-%m-%d}")])
    # version 1 scores origins -40..-31, version 3 origins -10..-2; version 2's 20 days are not scored
    assert out["last_60"]["n"] == 10 + 9
    assert out["unscored"] == ["version 2: RESOURCE_DOES_NOT_EXIST: version 2"]
