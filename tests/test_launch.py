"""Training beyond one process: Hydra launchers (joblib on one machine, submitit for SLURM), the
CPUs each job gets, and Lightning DDP on CPU (trainer=ddp, torchrun over two "nodes")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FORCE, ROOT, compose_train, forecast_from_export
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stockcast import launch
from stockcast.backtest import backtest, fold_processes
from stockcast.training import RunError, train

# the quickest runs that still train both fits and export (test_training.py's TINY)
TINY = ["experiment=petr4", "data.source=csv", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2", "~logger", FORCE]
DISTRIBUTED = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
               "SLURM_NTASKS", "SLURM_PROCID", launch.CPUS)


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun, srun or launcher variables from the environment the tests run in; whatever a
    test or configure() sets is undone after it (setenv first: delenv of an unset key records nothing)."""
    for key in (*DISTRIBUTED, "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return monkeypatch


def compose_hydra(*overrides: str):
    """configs/train.yaml with its hydra node, as `train.py ... --cfg all` shows it."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


# --- SLURM and the other cluster launchers: a config switch ---------------------------------------

def test_slurm_launcher_composes_with_the_project_sizes():
    cfg = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=cpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task, launcher.mem_gb) == (
        "cpu", 30, 2, 4)
    assert (launcher.nodes, launcher.tasks_per_node) == (1, 1)  # one process per job without DDP
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))  # its logs beside the sweep's
    # the plugin accepts every key (a misspelt one would fail here, not on the cluster)
    slurm = instantiate(launcher)
    assert slurm.params["partition"] == "cpu" and slurm.params["cpus_per_task"] == 2


def test_slurm_launcher_follows_the_ddp_trainer():
    cfg = compose_hydra("hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2")
    # srun starts one task per DDP process: trainer.devices on each of trainer.num_nodes nodes
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (2, 2)


def test_the_plugins_own_slurm_config_takes_the_documented_overrides():
    cfg = compose_hydra("hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu",
                        "hydra.launcher.timeout_min=30", "hydra.launcher.cpus_per_task=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task) == ("cpu", 30, 2)


def test_joblib_launcher_needs_no_project_config():
    launcher = compose_hydra("hydra/launcher=joblib").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == -1  # one job per CPU
    assert not (ROOT / "configs" / "hydra" / "launcher" / "joblib.yaml").exists()  # the plugin's own


# --- CPUs per job -------------------------------------------------------------------------------

@pytest.mark.parametrize(("launcher", "cpus", "expected"), [
    (None, 8, 8),                                                         # a plain run
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 8, 8),  # one job at a time
    ({"_target_": "x.JoblibLauncher", "n_jobs": -1}, 2, 1),              # 2 jobs side by side on 2 cores
    ({"_target_": "x.JoblibLauncher", "n_jobs": 2}, 8, 4),
    ({"_target_": "x.JoblibLauncher", "n_jobs": -2}, 8, 1),              # 7 jobs
    ({"_target_": "x.SlurmLauncher", "cpus_per_task": 2}, 64, 2),         # a cluster node's 64 cores
    ({"_target_": "x.LocalLauncher", "cpus_per_task": None}, 4, 4),
    ({"_target_": "x.RayLauncher", "ray": {"remote": {"num_cpus": 3}}}, 8, 3),
])
def test_each_job_gets_its_share_of_the_cpus(monkeypatch, launcher, cpus, expected):
    monkeypatch.setattr(launch, "available_cpus", lambda: cpus)
    assert launch.launcher_cpus(None if launcher is None else OmegaConf.create(launcher)) == expected


def test_threads_are_the_jobs_cpus_over_its_ddp_processes(clean_env, tmp_path):
    import torch

    before = torch.get_num_threads()
    clean_env.setattr(launch, "available_cpus", lambda: 8)
    joblib = OmegaConf.create({"_target_": "x.JoblibLauncher", "n_jobs": 2})
    try:
        one = compose_train(tmp_path, "experiment=petr4").trainer
        assert launch.configure(one, None) == 8 and "OMP_NUM_THREADS" not in os.environ  # torch's default
        assert launch.configure(one, joblib) == 4 and torch.get_num_threads() == 4
        assert os.environ["OMP_NUM_THREADS"] == "4" and launch.job_cpus() == 4  # the backtest's folds too
        ddp = compose_train(tmp_path, "experiment=petr4", "trainer=ddp").trainer
        assert launch.configure(ddp, None) == 4  # Lightning starts 2 processes here: 8 CPUs over 2
        clean_env.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node=4
        assert launch.configure(ddp, None) == 2
        clean_env.delenv("LOCAL_WORLD_SIZE")
        clean_env.setenv("SLURM_NTASKS", "2")  # srun: each task has its own cpus_per_task
        slurm = OmegaConf.create({"_target_": "x.SlurmLauncher", "cpus_per_task": 2})
        assert launch.configure(ddp, slurm) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("cpus", "n_jobs", "expected"),
                         [("2", -1, 2), ("1", -1, 1), ("8", -2, 7), ("1", 3, 3)])
def test_backtest_folds_use_the_jobs_cpus(clean_env, cpus, n_jobs, expected):
    clean_env.setenv(launch.CPUS, cpus)  # what configure() set for this job
    assert fold_processes(n_jobs) == expected


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True),
    ({"RANK": "1", "LOCAL_RANK": "0"}, False),  # torchrun, node 1
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # the process Lightning started
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # Lightning's launcher on node 1
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, False),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, True),
])
def test_global_rank_zero_is_known_before_lightning_sets_up(clean_env, env, zero):
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert launch.is_global_zero() is zero


# --- trainer=ddp ----------------------------------------------------------------------------------

def test_ddp_trainer_is_lightning_ddp_on_cpu_with_gloo(clean_env, tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_train(tmp_path, "experiment=petr4", "trainer=ddp")
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert (cfg.trainer.strategy.process_group_backend, cfg.trainer.accelerator) == ("gloo", "cpu")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, launch.world_size(cfg.trainer)) == (2, 1, 2)
    assert cfg.trainer.max_epochs == 50 and cfg.trainer.deterministic  # the rest is trainer/default.yaml's
    trainer = instantiate(cfg.trainer, enable_progress_bar=False, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 2
    assert trainer.strategy._process_group_backend == "gloo"
    # torchrun's --nproc_per_node and --nnodes
    clean_env.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = compose_train(tmp_path, "experiment=petr4", "trainer=ddp", "trainer.num_nodes=2")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, launch.world_size(cfg.trainer)) == (1, 2, 2)


def test_ddp_outside_train_py_is_refused(clean_env, tmp_path):
    # Lightning would start the second process by running this process's command (pytest) again
    with pytest.raises(RunError, match="trainer: DDP runs from train.py"):
        train(compose_train(tmp_path, "trainer=ddp", *TINY))
    assert not (tmp_path / "artifacts").exists()


def test_backtest_refuses_ddp(tmp_path):
    with pytest.raises(RunError, match="the walk-forward's folds are its parallelism"):
        backtest(compose_train(tmp_path, "experiment=petr4", "trainer=ddp"))


def run(*args: str, tmp_path: Path, script: str = "train.py", timeout: int = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """A CLI run writing only under tmp_path: its own MLflow store, artifacts and run folders."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", **(env or {})}
    for key in DISTRIBUTED:
        if key not in (env or {}):
            env.pop(key, None)
    command = [sys.executable, str(ROOT / script), *args, f"paths.artifacts_dir={tmp_path / 'a'}"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_with_a_sweep_is_refused(tmp_path):
    proc = run("-m", "trainer=ddp", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: trainer=ddp runs one training per command (-m would start the sweep again in every "
        "process): leave out -m, or start the processes with torchrun or srun"]
    assert not (tmp_path / "a").exists()


def versions(tmp_path: Path, name: str = "petr4") -> list:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").search_model_versions(f"name = '{name}'")


def train_runs(tmp_path: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("petr4")
    return client.search_runs([experiment.experiment_id], "tags.`stockcast.kind` = 'train'")


def assert_one_working_export(tmp_path: Path, run_dir: Path) -> None:
    """One registered version and one tracked run, and an export that reproduces its checkpoint."""
    from stockcast.export import check_export
    from stockcast.model import LSTMForecaster

    assert len(versions(tmp_path)) == 1 and len(train_runs(tmp_path)) == 1  # rank 0 alone registered
    out = tmp_path / "a" / "petr4"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["version"] == "1" and meta["checkpoint"].startswith("refit/checkpoints/")
    net = LSTMForecaster.load_from_checkpoint(run_dir / meta["checkpoint"], map_location="cpu").net
    sample = np.random.default_rng(0).normal(0, 1, (8, 59, 1)).astype(np.float32)
    assert check_export(out, net, sample)["passed"]  # model.pt and model.onnx give the network's outputs
    history = 30 * np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.02, (4, 80)), axis=1))
    forecast = forecast_from_export(out, history)
    assert forecast.shape == (4, 1) and np.all(np.abs(np.log(forecast[:, 0] / history[:, -1])) < 0.1)


@pytest.mark.slow
def test_ddp_two_processes_train_once_and_rank_0_alone_publishes(tmp_path):
    started = time.perf_counter()
    proc = run("trainer=ddp", *TINY, f"hydra.run.dir={tmp_path / 'run'}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr and "distributed_backend=gloo" in proc.stderr
    assert proc.stdout.count("test PETR4.SA") == 1  # one report, from rank 0
    assert "torch threads: 1 of" in (tmp_path / "run" / "train.log").read_text()  # 2 processes, 2 CPUs
    assert (tmp_path / "run" / "train_ddp_process_1.log").exists()  # the second process ran here
    assert_one_working_export(tmp_path, tmp_path / "run")
    print(f"DDP 2 processes: {time.perf_counter() - started:.1f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_on_two_nodes_trains_once_and_rank_0_exports(tmp_path):
    """Two torchrun agents on localhost standing in for two machines: node_rank 0 and 1, one
    process each, each with its own run folder (as on two machines without a shared disk)."""
    port, started = free_port(), time.perf_counter()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    for key in DISTRIBUTED:
        env.pop(key, None)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "train.py"),
         "trainer=ddp", "trainer.num_nodes=2", *TINY, f"hydra.run.dir={tmp_path / f'node{rank}'}",
         f"paths.artifacts_dir={tmp_path / 'a'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][0].count("test PETR4.SA") == 1 and "test PETR4.SA" not in outputs[1][0]
    assert "distributed_backend=gloo" in outputs[0][1] and "Starting with 2 processes" in outputs[0][1]
    assert (tmp_path / "node0" / "artifacts" / "model.onnx").exists()
    # node 1 trained (its process took part in both fits) and wrote only its log
    assert [p.name for p in (tmp_path / "node1").iterdir() if not p.name.startswith(".")] == ["train.log"]
    assert_one_working_export(tmp_path, tmp_path / "node0")
    print(f"torchrun 2 nodes: {time.perf_counter() - started:.1f} s")


# --- launchers for real -----------------------------------------------------------------------------

@pytest.mark.slow
def test_joblib_multirun_trains_two_tickers_side_by_side(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith("experiment=")]
    proc = run("-m", "experiment=petr4,vale3", "hydra/launcher=joblib", *overrides,
               f"hydra.sweep.dir={sweep}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=-1" in proc.stderr + proc.stdout
    for name, ticker in (("petr4", "PETR4.SA"), ("vale3", "VALE3.SA")):
        assert json.loads((tmp_path / "a" / name / "metrics.json").read_text())["ticker"] == ticker
        assert len(versions(tmp_path, name)) == 1
        (job,) = (sweep / name).iterdir()  # multirun/<time>/<name>/<job number>/
        log = (job / "train.log").read_text()  # each job's own log in its own folder
        assert f"test {ticker}" in log
        if (os.cpu_count() or 1) <= 2:
            assert "torch threads: 1 of 2 CPUs" in log  # 2 jobs on 2 cores: one thread each


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *TINY,
               f"hydra.sweep.dir={sweep}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "a" / "petr4" / "metrics.json").read_text())["ticker"] == "PETR4.SA"
    assert (sweep / "petr4" / "0" / "artifacts" / "model.onnx").exists()
    [job_log] = (sweep / ".submitit").glob("*/*_log.out")  # submitit's record of the job it ran
    assert "test PETR4.SA" in job_log.read_text()
    assert len(versions(tmp_path)) == 1
