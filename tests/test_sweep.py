"""hparams_search=optuna: a Hydra Optuna sweep of backtest.py over the walk-forward selection folds."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from omegaconf import OmegaConf
from test_backtest import TINY, series


def test_optuna_search_composes_and_minimises_the_selection_folds_metric():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("backtest", overrides=["hparams_search=optuna", "experiment=petr4"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.n_jobs == 1
    assert 5 <= sweeper.n_trials <= 16  # ~1 min a trial on 2 cores: the sweep fits in 15 minutes
    # only the selection folds: origins up to 2021-12-31; the later ones stay held out
    assert cfg.backtest.until == "2021-12-31" and cfg.backtest.start == "2019-01-01"
    # each trial writes into its own run folder, never over the gate's artifacts/backtest/<name>
    unresolved = OmegaConf.to_container(cfg, resolve=False)
    assert unresolved["backtest"]["out_dir"] == "${paths.output_dir}"
    assert "${hydra.job.num}" in unresolved["hydra"]["sweep"]["subdir"]
    parser = OverridesParser.create()
    space = {k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
             for k, v in sweeper.params.items()}
    assert set(space) == {"data.center", "model.lr", "model.hidden_size", "model.dropout",
                          "model.weight_decay"}
    assert all(k.split(".")[-1] in cfg[k.split(".")[0]] for k in space)  # real keys, not new ones
    lr = space["model.lr"]
    assert isinstance(lr, optuna.distributions.LogUniformDistribution) and lr.low < 0.001 < lr.high
    assert space["data.center"].choices == (0.0, 0.5, 1.0)


@pytest.mark.slow
def test_a_two_trial_sweep_runs_each_trial_in_its_own_folder(tmp_path):
    csv = series(tmp_path)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "backtest.py"), "-m", "hparams_search=optuna", "data.source=csv",
         f"data.snapshot={csv}", *TINY, "backtest.until=2020-01-31", "backtest.n_jobs=1",
         "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", f"paths.artifacts_dir={tmp_path / 'a'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = [json.loads((sweep / "petr4" / str(i) / "backtest.json").read_text()) for i in (0, 1)]
    assert all(t["until"] == "2020-01-31" and t["data_end"] <= "2020-01-31" for t in trials)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(t["objective"] for t in trials), rel=1e-12)
    assert not (tmp_path / "a" / "backtest").exists()  # the gate's evidence folder untouched
