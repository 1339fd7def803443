"""train(cfg) on the real composed configs: artifacts, export round trip, seeds, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, ROOT, compose_train, forecast_from_export, random_walk, write_flat_csv
from hydra.utils import instantiate

from stockcast.export import sha256
from stockcast.model import LSTMForecaster
from stockcast.training import train

METRIC_KEYS = {"mae", "rmse", "mape", "directional_accuracy"}


@pytest.mark.parametrize("experiment", ["petr4", "vale3", "itub4"])
def test_every_experiment_composes_and_instantiates(tmp_path, experiment):
    cfg = compose_train(tmp_path, f"experiment={experiment}")
    assert cfg.name == experiment and cfg.data.ticker.lower().startswith(experiment)
    assert Path(cfg.data.snapshot).exists()
    assert cfg.model.horizon == cfg.data.horizon == 1
    dm = instantiate(cfg.data)
    dm.setup()
    assert min(len(w) for w in dm.splits.values()) > 100
    assert isinstance(instantiate(cfg.model), LSTMForecaster)
    assert [type(instantiate(c)).__name__ for c in cfg.callbacks.values()] == [
        "ModelCheckpoint", "EarlyStopping"]


def test_horizon_is_defined_once(tmp_path):
    cfg = compose_train(tmp_path, "experiment=petr4", "data.horizon=5")
    assert cfg.model.horizon == 5


def test_fast_dev_run_writes_every_artifact(tmp_path):
    cfg = compose_train(tmp_path, "experiment=petr4", "+trainer.fast_dev_run=true")
    results = train(cfg)
    out = tmp_path / "artifacts" / "petr4"
    assert sorted(p.name for p in out.iterdir()) == [
        "forecast.png", "meta.json", "metrics.json", "model.onnx", "model.pt", "scaler.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"model", "persistence", "rmse_ratio", "ticker", "test_start",
                            "test_end", "n_test"}
    assert set(metrics["model"]) == set(metrics["persistence"]) == METRIC_KEYS
    assert metrics == results["test"] and metrics["ticker"] == "PETR4.SA"
    assert metrics["rmse_ratio"] == pytest.approx(
        metrics["model"]["rmse"] / metrics["persistence"]["rmse"])
    assert (out / "forecast.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["window"] == 60 and meta["horizon"] == 1 and meta["features"] == ["log_return"]
    assert meta["versions"]["torch"].startswith("2.") and meta["versions"]["onnxruntime"]
    assert meta["sha256"] == {n: sha256(out / n) for n in ("model.pt", "model.onnx", "scaler.json")}
    assert (tmp_path / "run" / "artifacts" / "metrics.json").exists()  # the run folder's copy
    assert not [p for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("horizon", [1, 5])
def test_export_round_trip_matches_the_lightning_checkpoint(tmp_path, horizon):
    cfg = compose_train(tmp_path, "experiment=petr4", f"data.horizon={horizon}", *QUICK)
    train(cfg)
    out = tmp_path / "artifacts" / "petr4"
    meta = json.loads((out / "meta.json").read_text())
    forecaster = LSTMForecaster.load_from_checkpoint(meta["checkpoint"]).eval()
    scaler = json.loads((out / "scaler.json").read_text())
    history = 30 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.02, (6, 80)), axis=1))
    # the reference: the checkpointed LightningModule, with the scaler applied by hand
    x = (np.diff(np.log(history[:, -60:]), axis=1) - scaler["mean"][0]) / scaler["scale"][0]
    with torch.no_grad():
        y = forecaster(torch.tensor(x[..., None], dtype=torch.float32)).double().numpy()
    expected = history[:, -1:] * np.exp(np.cumsum(y * scaler["scale"][0] + scaler["mean"][0], 1))
    got = forecast_from_export(out, history)
    assert got.shape == (6, horizon)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert not np.allclose(got, history[:, -1:], rtol=1e-4)  # trained: not a bare persistence


def test_same_seed_gives_the_same_metrics(tmp_path):
    first = train(compose_train(tmp_path / "a", "experiment=petr4", *QUICK))
    second = train(compose_train(tmp_path / "b", "experiment=petr4", *QUICK))
    third = train(compose_train(tmp_path / "c", "experiment=petr4", "seed=7", *QUICK))
    assert first == second
    assert first["test"]["model"] != third["test"]["model"]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_file_is_one_line_and_keeps_previous_artifacts(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Date,Close,Volume\n2020-01-01,10,1\n2020-01-02,ten,1\n")
    saved = tmp_path / "artifacts" / "petr4" / "metrics.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"saved": "by the user"}')
    proc = run_cli("experiment=petr4", "data.source=csv", f"data.snapshot={bad}",
                   f"paths.artifacts_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}, line 3: Close is not a number ('ten')"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert saved.read_text() == '{"saved": "by the user"}'


def test_cli_too_few_rows_names_the_file(tmp_path):
    short = write_flat_csv(tmp_path / "short.csv", random_walk(50, start="2016-01-01"))
    proc = run_cli("experiment=petr4", "data.source=csv", f"data.snapshot={short}",
                   f"paths.artifacts_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"\nerror: {short}: 50 rows are too few for window=60" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_multirun_trains_every_experiment(tmp_path):
    proc = run_cli("-m", "experiment=petr4,vale3,itub4", "data.source=csv", "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=2", f"paths.artifacts_dir={tmp_path / 'a'}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tickers = {n: json.loads((tmp_path / "a" / n / "metrics.json").read_text())["ticker"]
               for n in ("petr4", "vale3", "itub4")}
    assert tickers == {"petr4": "PETR4.SA", "vale3": "VALE3.SA", "itub4": "ITUB4.SA"}


@pytest.mark.slow
def test_full_petr4_run_beats_persistence(tmp_path):
    results = train(compose_train(tmp_path, "experiment=petr4"))
    test = results["test"]
    assert test["test_start"] >= "2022-04-01" and test["test_end"] == "2023-12-28"
    assert test["rmse_ratio"] <= 1.0, test
    assert results["val"]["rmse_ratio"] <= 1.0, results["val"]


def test_auto_source_tries_yfinance_once_per_run(tmp_path, monkeypatch, capsys):
    import pandas as pd
    import yfinance as yf

    calls = []
    monkeypatch.setattr(yf, "download", lambda *a, **k: calls.append(a) or pd.DataFrame())
    train(compose_train(tmp_path, "experiment=petr4", "data.source=auto",
                        f"data.cache_dir={tmp_path / 'cache'}", "+trainer.fast_dev_run=true"))
    assert len(calls) == 1  # Lightning calls prepare_data again inside fit()
    assert capsys.readouterr().out.count("yfinance unavailable") == 1


def test_a_run_failing_while_exporting_keeps_the_previous_artifacts(tmp_path, monkeypatch):
    import stockcast.training

    saved = tmp_path / "artifacts" / "petr4" / "metrics.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"saved": "earlier run"}')

    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stockcast.training, "plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        train(compose_train(tmp_path, "experiment=petr4", "+trainer.fast_dev_run=true"))
    assert saved.read_text() == '{"saved": "earlier run"}'
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["petr4"]  # no half-written copy
