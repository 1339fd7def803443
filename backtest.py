"""Walk-forward backtest against persistence and drift: python backtest.py experiment=petr4"""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stockcast.backtest import backtest
from stockcast.launch import configure
from stockcast.training import run_or_exit  # before hydra.main: it registers ${ticker_name:}

# data and artifact paths in the configs are relative to the project, wherever this is run from
os.environ.setdefault("STOCKCAST_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="backtest")
def main(cfg: DictConfig) -> float:
    # the folds share this job's CPUs (no Hydra launcher when main(cfg) is called directly)
    configure(cfg.trainer, HydraConfig.get().launcher if HydraConfig.initialized() else None)
    record = run_or_exit(backtest, cfg)
    return record["objective"]  # max(rmse_ratio, rmse_ratio_drift): what a sweeper minimises


if __name__ == "__main__":
    main()
