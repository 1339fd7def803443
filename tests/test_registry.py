"""Versions, the promotion gate (gate.py), rollback and MLflow tracking, in a temporary MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FORCE, NO_BACKTEST, ROOT, compose_train

from stockcast.backtest import pooled
from stockcast.gate import gate
from stockcast.package import build_archive
from stockcast.promotion import fingerprint
from stockcast.tracking import client
from stockcast.evaluation import LEVELS
from stockcast.training import train

TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2", "~logger"]


def rows(model_noise: float, n: int = 400, seed: int = 0) -> pd.DataFrame:
    """backtest.csv rows of a random walk: the model = persistence + noise of `model_noise`."""
    rng = np.random.default_rng(seed)
    close = 30 * np.exp(np.cumsum(rng.normal(0, 0.02, n + 1)))
    last, actual = close[:-1], close[1:]
    dates = pd.bdate_range("2020-01-01", periods=n)
    return pd.DataFrame({"fold": np.arange(n) // 100, "origin": dates[np.arange(n) // 100 * 100],
                         "target_date": dates, "step": 1, "last_close": last, "actual": actual,
                         "model": last * np.exp(rng.normal(0, model_noise, n)), "persistence": last,
                         "drift": last * np.exp(0.0003)})


def evidence_of(model_noise: float, **changes) -> dict:
    """A backtest.json record as backtest.py writes it, for 400 forecasts in 4 folds."""
    record = pooled(rows(model_noise), "X.SA")
    return {**record, "fingerprint": "a" * 64, "data_end": record["test_end"], "until": None, **changes}


def meta_for(evidence: dict | None, **changes) -> dict:
    meta = {"name": "petr4", "checkpoint": "refit/checkpoints/epoch003.ckpt",
            "checks": {"passed": True, "failures": []},
            "fingerprint": evidence["fingerprint"] if evidence else "f" * 64,
            "data": {"through": evidence["data_end"] if evidence else "2024-12-30"}}
    return {**meta, **changes}


def test_gate_accepts_a_model_not_significantly_worse_and_refuses_a_worse_one():
    close_to = evidence_of(0.0005)
    worse = evidence_of(0.02)  # noise as large as the moves
    assert close_to["dm_p_persistence"] >= 0.05 and worse["dm_p_persistence"] < 1e-6
    assert worse["dm_stat_persistence"] > 0 and worse["rmse_ratio"] > 1.2
    accepted = gate(meta_for(close_to), close_to)
    assert accepted.passed and "not significantly worse" in str(accepted)
    refused = gate(meta_for(worse), worse)
    assert not refused.passed
    assert "significantly worse than persistence (RMSE ratio" in str(refused) and "drift" in str(refused)


def test_gate_refuses_intervals_significantly_worse_than_ewma():
    from scipy.stats import norm

    def with_quantiles(model_sigma: float) -> dict:
        frame = rows(0.0005)
        z = norm.ppf(LEVELS)
        for name, sigma in (("model", model_sigma), ("ewma", 0.02), ("historical", 0.02)):
            for level, zz in zip(LEVELS, z, strict=True):
                frame[f"{name}_q{level}"] = frame["last_close"] * np.exp(zz * sigma)
        record = pooled(frame, "X.SA")
        return {**record, "fingerprint": "a" * 64, "data_end": record["test_end"], "until": None}

    right, narrow = with_quantiles(0.02), with_quantiles(0.006)  # the random walk's sigma is 0.02
    quantile_meta = meta_for(right, levels=list(LEVELS))
    assert gate(quantile_meta, right).passed
    without = {k: v for k, v in right.items() if k != "intervals"}  # a quantile model needs its scores
    assert "no intervals of this quantile model" in str(gate(quantile_meta, without))
    assert gate(meta_for(right), right).passed
    decision = gate(meta_for(narrow), narrow)
    assert narrow["intervals"]["model"]["coverage_95"] < 0.5
    assert not decision.passed and "significantly worse than EWMA's 80% intervals (interval score ratio" in str(
        decision) and "EWMA's 95% intervals" in str(decision)


def test_a_significantly_better_model_passes():
    rec = evidence_of(0.0005, dm_stat_persistence=-3.0, dm_p_persistence=0.003)  # better: negative statistic
    assert gate(meta_for(rec), rec).passed


@pytest.mark.parametrize("change, reason", [
    ({"checkpoint": None}, "it did not train"),
    ({"checks": {"passed": False, "failures": ["onnx differs from the network by 0.3 (> 0.0001)"]}},
     "export checks failed: ['onnx differs"),
    ({"checks": None}, "export checks failed: not run"),
    ({"fingerprint": "b" * 64}, "backtest is of another config or code (fingerprint aaaaaaaaaaaa"),
    ({"data": {"through": "2022-06-01"}}, "but the model saw closes to 2022-06-01: run `python backtest.py"),
])
def test_gate_refuses_an_untrained_unchecked_or_unbacktested_model(change, reason):
    rec = evidence_of(0.0005)
    decision = gate(meta_for(rec, **change), rec)
    assert not decision.passed and reason in str(decision)


@pytest.mark.parametrize("change, reason", [
    ({"n_test": 1}, "too little walk-forward evidence: 1 forecasts in 4 folds"),
    ({"folds": [{}]}, "too little walk-forward evidence: 400 forecasts in 1 folds"),
    ({"until": "2021-12-31"}, "a model-selection backtest (backtest.until=2021-12-31) is not evidence"),
    ({"dm_p_persistence": float("nan")}, "malformed"),
    ({"dm_p_drift": None}, "malformed"),
    ({"data_end": "last week"}, "data_end is not a date"),
])
def test_gate_refuses_too_little_selection_or_malformed_evidence(change, reason):
    rec = evidence_of(0.0005)
    meta = meta_for(rec)
    assert gate(meta, rec).passed
    decision = gate(meta, {**rec, **change})
    assert not decision.passed and reason in str(decision)
    rec.pop("dm_p_drift")
    assert "malformed" in str(gate(meta, rec))


def test_gate_rules_come_from_the_config():
    rec = evidence_of(0.0005, n_test=100)
    assert not gate(meta_for(rec), rec).passed
    assert gate(meta_for(rec), rec, min_forecasts=50).passed


def test_gate_refuses_a_model_without_a_backtest():
    decision = gate(meta_for(None), None)
    assert not decision.passed
    assert "no walk-forward backtest of this config: run `python backtest.py experiment=petr4`" in str(
        decision)


def test_fingerprint_ignores_the_date_range_and_splits_but_not_the_model(tmp_path):
    base = fingerprint(compose_train(tmp_path, "experiment=petr4"))
    assert base == fingerprint(compose_train(tmp_path, "experiment=petr4", "data.end=2024-12-31",
                                             "data.test=0.2", "data.val=0.15"))
    assert base != fingerprint(compose_train(tmp_path, "experiment=petr4", "model.hidden_size=32"))
    assert base != fingerprint(compose_train(tmp_path, "experiment=vale3"))
    assert base != fingerprint(compose_train(tmp_path, "experiment=petr4", "trainer.max_epochs=3"))


@pytest.fixture
def own_store(tmp_path, monkeypatch) -> str:
    """A store of this test's own: the champion stack of the session's store has other tests' versions."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def registry_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stockcast.registry", *args, "--root", str(root)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def served_version(artifacts: Path) -> str:
    return json.loads((artifacts / "meta.json").read_text())["version"]


def test_versions_promotion_refusal_and_rollback_change_what_package_archives(tmp_path, own_store):
    art = tmp_path / "artifacts" / "petr4"
    first = train(compose_train(tmp_path, "experiment=petr4", *TINY, FORCE))
    assert first["promoted"] and served_version(art) == first["version"]
    # no backtest of this config: refused, and the champion's files stay as they were
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    second = train(compose_train(tmp_path, "experiment=petr4", "seed=5", *TINY, NO_BACKTEST))
    assert not second["promoted"] and int(second["version"]) == int(first["version"]) + 1
    assert "no walk-forward backtest of this config" in second["gate"]
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    # forced by hand, with a reason that the registry keeps
    proc = registry_cli(tmp_path, "promote", "petr4", second["version"])
    assert proc.returncode == 3 and "not promoted" in proc.stderr and "--force" in proc.stderr
    (tmp_path / "bad.json").write_text("{not json")
    for evidence, message in ((tmp_path / "bad.json", "bad.json: not a readable walk-forward report"),
                              (tmp_path / "gone.json", "gone.json: not a readable walk-forward report")):
        proc = registry_cli(tmp_path, "promote", "petr4", second["version"], "--evidence", str(evidence))
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    proc = registry_cli(tmp_path, "promote", "petr4", second["version"], "--force", "a demo")
    assert proc.returncode == 0, proc.stderr
    assert served_version(art) == second["version"]
    mar = build_archive(art, tmp_path / "store", handlers=ROOT / "handlers")
    assert json.loads(subprocess.run(["unzip", "-p", str(mar), "MAR-INF/MANIFEST.json"], capture_output=True,
                                     text=True).stdout)["model"]["modelVersion"] == second["version"]
    mlflow = client(ROOT)
    assert mlflow.get_model_version("petr4", second["version"]).tags["forced"] == "a demo"
    listing = registry_cli(tmp_path, "list", "petr4").stdout
    assert (first["version"], second["version"]) == ("1", "2")  # numbered per model, from 1
    assert f"* {second['version']:>7}" in listing and "(forced: a demo)" in listing

    proc = registry_cli(tmp_path, "rollback", "petr4")
    assert proc.returncode == 0, proc.stderr
    assert f"from version {second['version']} to {first['version']}" in proc.stdout
    assert served_version(art) == first["version"]
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before  # the same files, byte for byte
    build_archive(art, tmp_path / "store", handlers=ROOT / "handlers")
    assert json.loads(subprocess.run(["unzip", "-p", str(mar), "MAR-INF/MANIFEST.json"], capture_output=True,
                                     text=True).stdout)["model"]["modelVersion"] == first["version"]
    assert mlflow.get_model_version_by_alias("petr4", "champion").version == int(first["version"])
    proc = registry_cli(tmp_path, "rollback", "petr4")  # nothing before the first champion
    assert proc.returncode == 1 and "no earlier champion" in proc.stderr and "Traceback" not in proc.stderr


def test_a_tampered_registered_file_is_refused(tmp_path):
    result = train(compose_train(tmp_path, "experiment=petr4", *TINY, FORCE))
    mlflow = client(ROOT)
    source = mlflow.get_model_version("petr4", result["version"]).source
    onnx = Path(source.removeprefix("file://")) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"x")
    proc = registry_cli(tmp_path, "promote", "petr4", result["version"], "--force", "x")
    assert proc.returncode == 1 and "model.onnx does not match its registered checksum" in proc.stderr


def test_every_run_is_tracked_with_its_config_report_epochs_and_files(tmp_path, mlflow_store):
    result = train(compose_train(tmp_path, "experiment=petr4", "trainer.max_epochs=2", *TINY[1:], FORCE))
    mlflow = client(ROOT)
    assert mlflow.tracking_uri == mlflow_store  # the tests' temporary store, never the project's
    run_id = mlflow.get_model_version("petr4", result["version"]).run_id
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stockcast.version"] == result["version"]
    assert run.data.params["model.hidden_size"] == "50" and run.data.params["data.ticker"] == "PETR4.SA"
    assert run.data.metrics["report.test.rmse_ratio"] == pytest.approx(result["test"]["rmse_ratio"])
    report = run.data.metrics
    assert report["report.test.dm_p_persistence"] == pytest.approx(result["test"]["dm_p_persistence"])
    files = {f.path for f in mlflow.list_artifacts(run_id, "export")}
    assert {"export/meta.json", "export/model.onnx", "export/forecast.png"} <= files
    children = mlflow.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.data.tags["stockcast.kind"] for c in children) == ["refit", "report"]
    for child in children:  # per-epoch metrics from Lightning
        assert len(mlflow.get_metric_history(child.info.run_id, "val/loss")) == 2


@pytest.mark.slow
def test_a_model_with_real_skill_passes_the_gate_on_its_own_backtest(tmp_path, own_store):
    """A series with real signal (AR(1) returns, phi 0.5): the backtest finds the skill, and the
    run with the same config becomes the champion on that evidence; another config does not."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from stockcast.backtest import backtest

    n, rng = 1200, np.random.default_rng(4)
    returns = np.zeros(n)
    for t in range(1, n):
        returns[t] = 0.5 * returns[t - 1] + rng.normal(0, 0.01)
    dates = pd.bdate_range("2018-01-01", periods=n, name="Date")
    close = 20 * np.exp(np.cumsum(returns))
    csv = tmp_path / "ar1.csv"
    pd.DataFrame({"Open": close, "High": close, "Low": close, "Close": close, "Volume": 1000},
                 index=dates).to_csv(csv)
    same = ["data.source=csv", f"data.snapshot={csv}", "data.window=20", "data.start=2018-01-01",
            "trainer.max_epochs=4", "model.lr=0.002", "data.batch_size=128", "~logger", "data.test=0.15",
            "backtest.start=2021-06-01", "backtest.step=65"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("backtest", overrides=[f"paths.root={ROOT}", *same])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "bt")
        cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
    record = backtest(cfg)
    assert record["rmse_ratio"] < 0.99 and record["dm_stat_persistence"] < 0
    assert record["dm_p_persistence"] < 0.01

    result = train(compose_train(tmp_path, *same))
    assert result["promoted"] and "not significantly worse" in result["gate"], result["gate"]
    meta = json.loads((tmp_path / "artifacts" / "petr4" / "meta.json").read_text())
    assert meta["version"] == result["version"] and meta["fingerprint"] == record["fingerprint"]
    assert json.loads((tmp_path / "artifacts" / "petr4" / "backtest.json").read_text()) == record

    other = train(compose_train(tmp_path, *same, "model.hidden_size=8", NO_BACKTEST))  # not backtested
    assert not other["promoted"] and "of another config" in other["gate"]
    assert served_version(tmp_path / "artifacts" / "petr4") == meta["version"]
    # gate.backtest=auto (the default): the run backtests its own config first, then is judged on it
    third = train(compose_train(tmp_path, *same, "model.hidden_size=8"))
    evidence = json.loads((tmp_path / "artifacts" / "backtest" / "petr4" / "backtest.json").read_text())
    third_meta = json.loads((tmp_path / "run" / "artifacts" / "meta.json").read_text())
    assert evidence["fingerprint"] == third_meta["fingerprint"] != meta["fingerprint"]
    assert evidence["n_test"] == record["n_test"] and evidence["until"] is None
    assert "walk-forward" in third["gate"] and "another config" not in third["gate"]


@pytest.mark.slow
def test_two_trainings_at_once_on_a_fresh_store_each_register_a_version(tmp_path, own_store):
    # the first use of a SQLite store creates its tables: concurrent first uses raced there
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "experiment=petr4", "data.source=csv",
                               *TINY, FORCE, f"paths.artifacts_dir={tmp_path / 'a'}",
                               f"hydra.run.dir={tmp_path / f'run{i}'}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[-1][-3000:]
    versions = client(ROOT).search_model_versions("name = 'petr4'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = client(ROOT).get_model_version_by_alias("petr4", "champion").version
    assert served_version(tmp_path / "a" / "petr4") == str(champion)


@pytest.mark.slow
def test_a_tracking_server_that_is_down_is_one_error_line_not_a_traceback(tmp_path, monkeypatch):
    from stockcast.serve import free_ports

    [port] = free_ports(1)  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=petr4", "data.source=csv",
                           *TINY, f"paths.artifacts_dir={tmp_path / 'a'}",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: MLflow store http://127.0.0.1:{port}: ")
    assert not (tmp_path / "a" / "petr4").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "{not json"])
def test_an_unreadable_evidence_file_is_a_one_line_run_error(tmp_path, text):
    from omegaconf import OmegaConf

    from stockcast.promotion import evidence
    from stockcast.training import RunError

    path = tmp_path / "backtest.json"
    path.write_text(text)
    with pytest.raises(RunError, match="backtest.json: not a .*walk-forward report.*: run backtest.py again"):
        evidence(OmegaConf.create({"gate": {"evidence": str(path)}}))
    assert evidence(OmegaConf.create({"gate": {"evidence": str(tmp_path / "none.json")}})) is None
