"""Where a job runs: the CPUs it may use when a Hydra launcher runs jobs side by side (joblib,
submitit, Ray) or Lightning DDP runs several training processes on one machine, and which process
is global rank 0, the only one that evaluates, exports, registers and gates.

    python train.py -m experiment=petr4,vale3 hydra/launcher=joblib    # one thread per job on 2 cores
    python train.py trainer=ddp                                          # 2 processes, 1 thread each
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, ListConfig, OmegaConf

CPUS = "STOCKCAST_CPUS"  # one job's CPUs, for what it starts in turn (the backtest's fold processes)


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (what SLURM, taskset or a container
    granted), not the machine's count, which is what os.cpu_count() says on a 64-core cluster node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def job_cpus() -> int:
    """This job's CPUs: STOCKCAST_CPUS when a launcher shares the machine between jobs, else all."""
    return max(1, int(os.environ.get(CPUS) or available_cpus()))


def launcher_cpus(launcher: DictConfig | None) -> int:
    """The CPUs of one job of a multirun: the available ones over joblib's parallel jobs (n_jobs -1:
    one job per CPU), submitit's cpus_per_task, Ray's num_cpus, or all of them (the basic launcher
    runs one job after the other)."""
    cpus = available_cpus()
    if launcher is None:
        return cpus
    if str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs") or 1)
        n_jobs = cpus + 1 + n_jobs if n_jobs < 0 else n_jobs  # joblib's: -1 all CPUs, -2 all but one
        return max(1, cpus // max(1, n_jobs))
    granted = launcher.get("cpus_per_task") or OmegaConf.select(launcher, "ray.remote.num_cpus")
    return max(1, min(cpus, int(granted))) if granted else cpus


def world_size(trainer: DictConfig) -> int:
    """Processes of one fit: trainer.devices (on CPU each device is a process) x trainer.num_nodes."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, ListConfig)):
        n = len(devices)
    else:
        n = int(devices) if str(devices).lstrip("-").isdigit() else 1  # "auto" on CPU: 1
        n = available_cpus() if n < 0 else n
    return max(1, n) * int(trainer.get("num_nodes") or 1)


def local_processes(trainer: DictConfig) -> int:
    """Training processes sharing this job's CPUs: torchrun's nproc_per_node, 1 under srun (each
    task has its own cpus_per_task), else trainer.devices (Lightning starts them on this machine)."""
    if world_size(trainer) == 1:
        return 1
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return 1
    return world_size(trainer) // int(trainer.get("num_nodes") or 1)


def launched_externally() -> bool:
    """Whether torchrun or srun started every process (Lightning then starts none itself)."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def is_global_zero() -> bool:
    """Whether this process is global rank 0, known before Lightning sets up: torchrun sets RANK,
    srun SLURM_PROCID, and Lightning's own launcher NODE_RANK and LOCAL_RANK for the processes it
    starts (the first process of node 0 has neither)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env.get("SLURM_PROCID", "0")) == 0
    return int(env.get("NODE_RANK", env.get("GROUP_RANK", "0"))) == 0 and int(env.get("LOCAL_RANK", "0")) == 0


def configure(trainer: DictConfig, launcher: DictConfig | None) -> int:
    """Share this job's CPUs (launcher_cpus) between its training processes on this machine:
    torch threads = CPUs / processes, also as OMP_NUM_THREADS so that Lightning's DDP launcher and
    the processes it starts keep it; STOCKCAST_CPUS for the backtest's folds. Return the threads.
    A job with every CPU to itself keeps torch's default (the physical cores it may run on)."""
    import torch

    cpus = launcher_cpus(launcher)
    threads = max(1, cpus // local_processes(trainer))
    os.environ[CPUS] = str(cpus)
    if threads < available_cpus():
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    return threads
