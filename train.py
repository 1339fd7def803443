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
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from stockcast.prices import DataError
from stockcast.tracking import tracking_uri
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
    except MlflowException as err:  # the tracking store (MLFLOW_TRACKING_URI) is down or refuses
        print(f"error: MLflow store {tracking_uri(cfg.paths.root)}: {' '.join(str(err).split())[:300]}",
              file=sys.stderr)
        sys.exit(2)
    if not results["promoted"] and HydraConfig.get().mode == RunMode.RUN:  # a sweep goes on
        sys.exit(3)  # registered, not the champion (the log says why): make stops here
    return results["val"]["rmse_ratio"]  # what a sweeper minimises: val, never test


if __name__ == "__main__":
    main()
