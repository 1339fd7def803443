"""Export for serving: TorchScript model, scaler as JSON (no pickle) and meta.json with checksums."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from stockcast.model import LSTMNet

MODEL_FILE, SCALER_FILE, META_FILE = "model.pt", "scaler.json", "meta.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def scaler_to_dict(scaler: StandardScaler, features: list[str]) -> dict:
    """Fitted StandardScaler parameters: scaled = (x - mean) / scale, per feature."""
    return {"kind": "StandardScaler", "features": features,
            "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()}


def export_model(net: LSTMNet, out_dir: Path, scaler: StandardScaler, features: list[str],
                 meta: dict) -> Path:
    """Write model.pt, scaler.json and meta.json into `out_dir`; return the meta.json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = net.cpu().eval()
    # scripted and frozen: BaseHandler loads it with torch.jit.load, no Lightning or stockcast needed
    scripted = torch.jit.freeze(torch.jit.script(net))
    scripted.save(str(out_dir / MODEL_FILE))
    (out_dir / SCALER_FILE).write_text(json.dumps(scaler_to_dict(scaler, features), indent=2))
    meta = {
        **meta,
        "features": features,
        "model_file": MODEL_FILE,
        "scaler_file": SCALER_FILE,
        "sha256": {name: sha256(out_dir / name) for name in (MODEL_FILE, SCALER_FILE)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir / META_FILE


def publish(staging: Path, target: Path) -> None:
    """Replace `target` by the complete `staging` folder, so no half-written target is ever seen."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    Path(staging).rename(target)
    shutil.rmtree(old, ignore_errors=True)
