"""Walk-forward backtest against persistence and drift: python backtest.py experiment=petr4"""

import os
import sys
from pathlib import Path

import hydra
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from stockcast.backtest import backtest
from stockcast.prices import DataError
from stockcast.tracking import tracking_uri
from stockcast.training import RunError  # before hydra.main: it registers ${ticker_name:}

# data and artifact paths in the configs are relative to the project, wherever this is run from
os.environ.setdefault("STOCKCAST_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="backtest")
def main(cfg: DictConfig) -> float:
    try:
        record = backtest(cfg)
    except (DataError, RunError) as err:  # the user's to fix (file, config): one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except MlflowException as err:  # the tracking store (MLFLOW_TRACKING_URI) is down or refuses
        print(f"error: MLflow store {tracking_uri(cfg.paths.root)}: {' '.join(str(err).split())[:300]}",
              file=sys.stderr)
        sys.exit(2)
    return record["objective"]  # max(rmse_ratio, rmse_ratio_drift): what a sweeper minimises


if __name__ == "__main__":
    main()
