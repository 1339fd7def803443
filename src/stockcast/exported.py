"""An exported folder (model.onnx, scaler.json, meta.json; stockcast.export) run with ONNX Runtime
the way the TorchServe handler runs it: closes -> stockcast.features -> the network -> closes and
intervals. The make-bench peer serves it, and stockcast.quality replays what was served with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stockcast import features


@dataclass(frozen=True)
class ExportedModel:
    """One exported version, ready to forecast; `mean` and `scale` are scaler.json's, per feature."""

    folder: Path
    meta: dict
    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F]
    session: object  # onnxruntime.InferenceSession

    @property
    def window(self) -> int:
        return int(self.meta["window"])

    @property
    def levels(self) -> list[float]:
        return [float(x) for x in self.meta.get("levels") or []]  # [] for a point model

    @property
    def intervals(self) -> list[tuple[float, int, int]]:
        """[(nominal coverage, lower index, upper index)]: [(0.8, 1, 3), (0.95, 0, 4)]."""
        return features.interval_pairs(self.levels)

    def forecast(self, closes: np.ndarray, high: np.ndarray | None = None,
                 low: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """[B, window] closes (and highs and lows, NaN where unknown) -> ([B, H] closes, [B, H, Q]
        quantile closes or None), in one ONNX run."""
        closes = np.asarray(closes, dtype=np.float64)
        x = features.to_inputs(closes, self.mean, self.scale, high, low)  # [B, T-1, F]
        y = self.session.run(None, {"x": x})[0]  # [B, H] or [B, H, Q]
        return features.to_forecasts(closes[:, -1], y, self.mean[0], self.scale[0], self.levels)


def load(folder: Path, threads: int = 1) -> ExportedModel:
    """The exported folder's model on `threads` intra- and inter-op threads (the handler's default: 1)."""
    import onnxruntime as ort  # here: importing stockcast.exported stays cheap

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    scaler = json.loads((folder / meta.get("scaler_file", "scaler.json")).read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = ort.InferenceSession(str(folder / meta.get("model_files", {}).get("onnx", "model.onnx")),
                                   options, providers=["CPUExecutionProvider"])
    return ExportedModel(folder, meta, np.array(scaler["mean"], dtype=np.float64),
                         np.array(scaler["scale"], dtype=np.float64), session)
