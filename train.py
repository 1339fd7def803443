"""Train, compare with persistence and drift, refit on all data, export, register a version and
promote it if the gate passes: python train.py experiment=petr4

Exit codes: 0 the new version is the champion, 2 a bad file or config (one `error:` line), 3 the
version was registered but the gate refused it (the log says why; the champion is unchanged)."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from stockcast.training import run_or_exit, train  # before hydra.main: it registers ${ticker_name:}

# data and artifact paths in the configs are relative to the project, wherever this is run from
os.environ.setdefault("STOCKCAST_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    results = run_or_exit(train, cfg)
    if not results["promoted"] and HydraConfig.get().mode == RunMode.RUN:  # a sweep goes on
        sys.exit(3)  # registered, not the champion (the log says why): make stops here
    return results["val"]["rmse_ratio"]  # what a sweeper minimises: val, never test


if __name__ == "__main__":
    main()
