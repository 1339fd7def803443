"""Experiment tracking with MLflow: one run per train.py or backtest.py run (parameters, the report,
plots, files), and a child run per Lightning fit with its per-epoch metrics. The store is
MLFLOW_TRACKING_URI, else mlruns.db in the project (`make ui` browses it)."""

from __future__ import annotations

import fcntl
import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# a remote store that is down fails a run in seconds, not after MLflow's ~4 minutes of retries
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in train.log

PARAMS = ("seed", "data", "model", "trainer", "callbacks", "refit", "backtest")  # what defines a run


def tracking_uri(root: str | Path) -> str:
    """MLFLOW_TRACKING_URI (any MLflow server), else a SQLite file in the project: nothing to start."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlruns.db'}"


def client(root: str | Path):
    """An MlflowClient on the project's store; its experiments keep files under root/mlartifacts."""
    from mlflow import MlflowClient  # ~1.5 s: imported only where tracking happens

    for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." per new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = tracking_uri(root)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    # the first use of a new SQLite store creates its tables: two runs starting together on a
    # fresh clone raced there ("table logged_models already exists"); one at a time
    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{uri.removeprefix('sqlite:///')}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        mlflow_client = MlflowClient(uri)
        mlflow_client.search_experiments(max_results=1)
        mlflow_client.search_registered_models(max_results=1)
    return mlflow_client


def experiment_id(mlflow_client, name: str) -> str:
    """The MLflow experiment `name`, created on first use (files in mlartifacts/<name> beside a
    SQLite store; a server decides for itself)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    uri = mlflow_client.tracking_uri
    # beside a SQLite store (MLflow's default would be ./mlruns of whatever folder it runs in)
    where = ((Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
             if uri.startswith("sqlite:///") else None)
    try:
        return mlflow_client.create_experiment(name, artifact_location=where)
    except Exception:  # created by a concurrent run in between
        found = mlflow_client.get_experiment_by_name(name)
        if not found:
            raise
        return found.experiment_id


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's limit on a parameter value
    return flat


def numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a report (nested dicts), as MLflow metric names."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class Run:
    """An MLflow run for `name` (the experiment), its config logged as parameters."""

    def __init__(self, cfg: DictConfig, name: str, kind: str) -> None:
        self.root = Path(cfg.paths.root)
        self.client = client(self.root)
        self.experiment = experiment_id(self.client, name)
        run = self.client.create_run(self.experiment, run_name=f"{kind} {Path(cfg.paths.output_dir).name}",
                                     tags={"stockcast.kind": kind})
        self.id = run.info.run_id

    def log_params(self, cfg: DictConfig) -> None:
        """The resolved config's PARAMS sections, flattened: model.hidden_size=50, ..."""
        config = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
                  for k, v in ((k, cfg[k]) for k in PARAMS if k in cfg)}
        self.client.log_batch(self.id, params=[_param(k, v) for k, v in flatten(config).items()])

    def epoch_logger(self, stage: str):
        """A Lightning logger writing one fit's per-epoch metrics to a child run named `stage`."""
        from lightning.pytorch.loggers import MLFlowLogger

        child = self.client.create_run(self.experiment, run_name=stage,
                                       tags={"mlflow.parentRunId": self.id, "stockcast.kind": stage})
        return MLFlowLogger(tracking_uri=self.client.tracking_uri, run_id=child.info.run_id)

    def log_report(self, report: dict, prefix: str) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, 0, 0) for k, v in numbers(report, f"{prefix}.").items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.id, metrics=metrics[start : start + 1000])

    def log_files(self, folder: Path, path: str | None = None) -> None:
        self.client.log_artifacts(self.id, str(folder), path)

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.id, str(path))

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.id, key, value)

    def end(self, ok: bool) -> None:
        self.client.set_terminated(self.id, "FINISHED" if ok else "FAILED")


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)
