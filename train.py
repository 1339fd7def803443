"""Train, compare with persistence and drift, refit on all data, export, register a version and
promote it if the gate passes: python train.py experiment=petr4

    python train.py -m experiment=petr4,vale3 hydra/launcher=joblib   # jobs side by side
    python train.py experiment=petr4 trainer=ddp                       # one fit in 2 processes

Exit codes: 0 the new version is the champion, 2 a bad file or config (one `error:` line), 3 the
version was registered but the gate refused it (the log says why; the champion is unchanged)."""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from stockcast.launch import available_cpus, configure, launched_externally, world_size
from stockcast.training import run_or_exit, train  # before hydra.main: it registers ${ticker_name:}

# data and artifact paths in the configs are relative to the project, wherever this is run from
os.environ.setdefault("STOCKCAST_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    job = HydraConfig.get() if HydraConfig.initialized() else None  # None: main(cfg) called directly
    multirun = job is not None and job.mode == RunMode.MULTIRUN
    if multirun and world_size(cfg.trainer) > 1 and not launched_externally():
        # Lightning starts the other DDP processes by running this command again: the whole sweep
        print("error: trainer=ddp runs one training per command (-m would start the sweep again in "
              "every process): leave out -m, or start the processes with torchrun or srun", file=sys.stderr)
        sys.exit(2)
    threads = configure(cfg.trainer, job and job.launcher)  # torch threads: the CPUs over the processes
    if threads < available_cpus():  # shared with other jobs or DDP processes: say so in train.log
        logging.getLogger(__name__).info(f"torch threads: {threads} of {available_cpus()} CPUs")
    results = run_or_exit(train, cfg)
    if not results:
        return None  # a DDP process other than rank 0: rank 0 reports
    if not results["promoted"] and not multirun:  # a sweep goes on
        sys.exit(3)  # registered, not the champion (the log says why): make stops here
    return results["val"]["rmse_ratio"]  # what a sweeper minimises: val, never test


if __name__ == "__main__":
    main()
