"""Shared fixtures: the real Hydra configs composed for fast offline runs, and tiny price files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]


def compose_train(tmp_path: Path, *overrides: str) -> DictConfig:
    """configs/train.yaml as train.py sees it, writing only under `tmp_path`."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data.source=csv", f"paths.root={ROOT}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
        cfg.trainer.enable_progress_bar = False
    return cfg


def random_walk(n: int = 400, start: str = "2020-01-01", seed: int = 0) -> pd.DataFrame:
    """A business-day random walk of closes, like a real price series."""
    rng = np.random.default_rng(seed)
    close = 20 * np.exp(np.cumsum(rng.normal(0.0003, 0.02, n)))
    return pd.DataFrame({"close": close}, index=pd.bdate_range(start, periods=n, name="date"))


@pytest.fixture
def walk() -> pd.DataFrame:
    return random_walk()


def write_flat_csv(path: Path, frame: pd.DataFrame) -> Path:
    """The flat `Date,Open,High,Low,Close,Volume` shape."""
    out = pd.DataFrame({"Open": frame.close, "High": frame.close, "Low": frame.close,
                        "Close": frame.close, "Volume": 1000}, index=frame.index.rename("Date"))
    out.to_csv(path)
    return path
