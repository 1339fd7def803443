"""Train, compare with persistence, export: python train.py experiment=petr4"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from stockcast.prices import DataError
from stockcast.training import RunError, train  # before hydra.main: it registers ${ticker_name:}

# data and artifact paths in the configs are relative to the project, wherever this is run from
os.environ.setdefault("STOCKCAST_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        results = train(cfg)
    except (DataError, RunError) as err:  # the user's to fix (file, config): one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["val"]["rmse_ratio"]  # what a sweeper minimises: val, never test


if __name__ == "__main__":
    main()
