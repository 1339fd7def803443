"""Train, compare with persistence, export: python train.py experiment=petr4"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# data and artifact paths in the configs are relative to the project, wherever this is run from
os.environ.setdefault("STOCKCAST_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from stockcast.prices import DataError
    from stockcast.training import train

    try:
        results = train(cfg)
    except DataError as err:  # a bad data file is the user's to fix: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["val"]["rmse_ratio"]  # what a sweeper minimises: val, never test


if __name__ == "__main__":
    main()
