"""Export for serving: the model as ONNX and TorchScript, the scaler as JSON (no pickle), meta.json."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from stockcast.model import LSTMNet

LIBRARIES = ["torch", "lightning", "numpy", "pandas", "scikit-learn", "onnx", "onnxruntime"]
MODEL_FILE, ONNX_FILE, SCALER_FILE, META_FILE = "model.pt", "model.onnx", "scaler.json", "meta.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def scaler_to_dict(scaler: StandardScaler, features: list[str]) -> dict:
    """Fitted StandardScaler parameters: scaled = (x - mean) / scale, per feature."""
    return {"kind": "StandardScaler", "features": features,
            "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()}


def export_model(net: LSTMNet, out_dir: Path, scaler: StandardScaler, features: list[str],
                 meta: dict, sample: np.ndarray) -> Path:
    """Write model.pt, model.onnx, scaler.json and meta.json into `out_dir`, with meta["checks"]
    saying whether both model files reproduce `net` on `sample` inputs; return meta.json's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = net.cpu().eval()
    # scripted and frozen: loads with torch.jit.load, no Lightning or stockcast needed
    scripted = torch.jit.freeze(torch.jit.script(net))
    scripted.save(str(out_dir / MODEL_FILE))
    export_onnx(net, out_dir / ONNX_FILE, window_returns=int(meta["window"]) - 1)
    (out_dir / SCALER_FILE).write_text(json.dumps(scaler_to_dict(scaler, features), indent=2))
    meta = {
        **meta,
        "features": features,
        "model_files": {"torchscript": MODEL_FILE, "onnx": ONNX_FILE},
        "scaler_file": SCALER_FILE,
        "sha256": {name: sha256(out_dir / name) for name in (MODEL_FILE, ONNX_FILE, SCALER_FILE)},
        "checks": check_export(out_dir, net, sample),
        "versions": {"python": platform.python_version(),
                     **{lib: version(lib) for lib in LIBRARIES}},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir / META_FILE


def check_export(out_dir: Path, net: LSTMNet, sample: np.ndarray, atol: float = 1e-4) -> dict:
    """Do model.pt and model.onnx give `net`'s outputs on `sample` [N, T, F] (scaled returns, ~1)?
    The promotion gate refuses an export that does not."""
    import onnxruntime as ort

    x = np.ascontiguousarray(sample, dtype=np.float32)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
        got = {"torchscript": torch.jit.load(str(out_dir / MODEL_FILE))(torch.from_numpy(x)).numpy()}
    session = ort.InferenceSession(str(out_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    got["onnx"] = session.run(None, {"x": x})[0]
    diff = {k: float(np.max(np.abs(y - expected))) if y.shape == expected.shape else math.inf
            for k, y in got.items()}
    failures = [f"{k} differs from the network by {d:.3g} (> {atol})"
                for k, d in diff.items() if not d <= atol]
    if not np.all(np.isfinite(expected)):
        failures.append("the network gives non-finite outputs")
    return {"passed": not failures, "failures": failures, "n": len(x), "max_abs_diff": diff}


def export_onnx(net: LSTMNet, path: Path, window_returns: int) -> None:
    """ONNX with a dynamic batch axis: input "x" [B, T, F] -> output "y" [B, H]."""
    x = torch.zeros(1, window_returns, net.lstm.input_size)
    with warnings.catch_warnings():  # the LSTM-with-batch_first export warns, and works
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript-based exporter keeps the batch axis dynamic as asked
        torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
                          opset_version=17)


def publish(staging: Path, target: Path) -> None:
    """Replace `target` by the complete `staging` folder, so no half-written target is ever seen."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    Path(staging).rename(target)
    shutil.rmtree(old, ignore_errors=True)
