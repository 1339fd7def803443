"""TorchServe handler: {"history": [closes]} -> the next `horizon` closes, scaler applied around the model.

It reads window, horizon and the scaler from the archive's meta.json and scaler.json (written by
stockcast.export) and needs neither Lightning nor stockcast. Bad requests get a JSON 400 of their
own, even inside a batch; the other requests of the batch still get their forecasts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)
JSON_TYPES = {str: "a string", bool: "a boolean", type(None): "null", list: "an array",
              dict: "an object"}


class ForecastHandler(BaseHandler):
    class BadRequest(ValueError):  # nested: TorchServe wants exactly one class in this module
        """A request this handler refuses; `reason` labels the RequestsRejected metric."""

        def __init__(self, reason: str, message: str) -> None:
            super().__init__(message)
            self.reason = reason

    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        model_file = context.manifest["model"]["serializedFile"]
        meta = json.loads((model_dir / "meta.json").read_text())
        for name in (model_file, meta["scaler_file"]):
            actual = hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
            if actual != meta["sha256"].get(name):
                log.error("refusing to load: %s sha256 %s != %s in meta.json", name, actual,
                          meta["sha256"].get(name))
                raise RuntimeError(f"{name} does not match the checksum in meta.json")
        scaler = json.loads((model_dir / meta["scaler_file"]).read_text())
        self.mean, self.scale = float(scaler["mean"][0]), float(scaler["scale"][0])
        self.window, self.horizon = int(meta["window"]), int(meta["horizon"])
        settings = (context.model_yaml_config or {}).get("handler", {})
        self.max_history = int(settings.get("max_history", 10000))
        self.info = {"name": context.model_name, "ticker": meta["ticker"],
                     "version": context.manifest["model"].get("modelVersion", "")}
        # the worker logs a line per request at INFO on the root logger; ts.metrics must stay at
        # INFO: its lines carry ForecastsServed and RequestsRejected to the frontend
        logging.getLogger().setLevel(settings.get("log_level", "WARNING"))
        logging.getLogger("ts.metrics").setLevel(logging.INFO)
        # one intra-op thread per worker (one worker per core): with a thread per core in every
        # worker they oversubscribe the cores; TorchScript served 12 req/s at concurrency 4 that
        # way on 2 cores. 0 keeps the library default.
        threads = int(settings.get("threads", 1))
        if threads:
            torch.set_num_threads(threads)
        if model_file.endswith(".onnx"):  # BaseHandler's ONNX session takes every core: not that
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = threads
            self.session = ort.InferenceSession(str(model_dir / model_file), options,
                                                providers=["CPUExecutionProvider"])
            self.context, self.initialized = context, True
        else:
            self.session = None
            super().initialize(context)  # loads the TorchScript model.pt, in eval mode

    def parse(self, row: dict) -> np.ndarray:
        """One request -> its last `window` closes as float64 [T], or BadRequest."""
        body = row.get("data") if row.get("data") is not None else row.get("body")
        if isinstance(body, (bytes, bytearray)):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                raise self.BadRequest("invalid_json", "body is not valid UTF-8") from None
        if isinstance(body, str):
            if not body.strip():
                raise self.BadRequest("empty_body", 'empty body: send {"history": [closes]}')
            try:
                body = json.loads(body)
            except (ValueError, RecursionError):
                raise self.BadRequest("invalid_json", "body is not valid JSON") from None
        if body is None:  # also what a form-encoded body (curl -d without a Content-Type) becomes
            raise self.BadRequest("empty_body", 'no JSON body: send {"history": [closes]} with '
                                                "Content-Type: application/json")
        if not isinstance(body, dict):
            raise self.BadRequest("not_object", 'body must be a JSON object: {"history": [closes]}')
        if "history" not in body:
            raise self.BadRequest("missing_history", 'missing "history": a list of closing prices')
        history = body["history"]
        if not isinstance(history, list):
            raise self.BadRequest("not_list", '"history" must be a list of closing prices')
        if len(history) < self.window:
            raise self.BadRequest("too_short", f'"history" needs at least {self.window} closes, '
                                          f"got {len(history)}")
        if len(history) > self.max_history:
            raise self.BadRequest("too_long", f'"history" has {len(history)} closes; the maximum is '
                                         f"{self.max_history}")
        for i, value in enumerate(history):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = JSON_TYPES.get(type(value), type(value).__name__)
                raise self.BadRequest("not_number", f"history[{i}] is not a number but {kind}")
            if not math.isfinite(value):  # Python's JSON parser accepts NaN, Infinity and 1e999
                raise self.BadRequest("not_finite", f"history[{i}] is not a finite number")
            if value <= 0:
                raise self.BadRequest("not_positive", f"history[{i}] must be a positive price, got {value}")
        return np.asarray(history[-self.window :], dtype=np.float64)

    def forecast(self, closes: np.ndarray) -> np.ndarray:
        """[B, T] closes -> [B, H] forecast closes."""
        x = (np.diff(np.log(closes), axis=1) - self.mean) / self.scale  # [B, T-1]
        x = x[..., None].astype(np.float32)  # [B, T-1, F]
        if self.session is not None:
            y = self.session.run(None, {"x": x})[0]  # [B, H]
        else:
            with torch.inference_mode():
                y = self.model(torch.from_numpy(x)).numpy()  # [B, H]
        returns = y.astype(np.float64) * self.scale + self.mean
        with np.errstate(over="ignore"):  # an overflow becomes inf, which handle() refuses
            return closes[:, -1:] * np.exp(np.cumsum(returns, axis=1))

    def handle(self, data: list[dict], context) -> list[dict]:
        """One response per request: a forecast, or an error object with a 400 of its own."""
        results: list[dict | None] = [None] * len(data)
        good: list[int] = []
        rows: list[np.ndarray] = []
        for i, row in enumerate(data):
            try:
                rows.append(self.parse(row))
                good.append(i)
            except self.BadRequest as err:
                results[i] = self.reject(context, i, err)
        if rows:
            forecasts = self.forecast(np.stack(rows))  # the whole batch in one forward pass
            served = 0
            for i, f in zip(good, forecasts, strict=True):
                if not np.isfinite(f).all():  # finite prices whose forecast overflows (~1e308)
                    results[i] = self.reject(context, i, self.BadRequest(
                        "forecast_overflow", "prices too large: the forecast is not finite"))
                    continue
                results[i] = {"prediction": float(f[0]), "forecast": f.tolist(),
                              "window": self.window, "horizon": self.horizon, "model": self.info}
                context.set_response_content_type(i, "application/json")
                served += 1
            if served:
                self.count(context, "ForecastsServed", served)
        return results

    def reject(self, context, idx: int, err: ForecastHandler.BadRequest) -> dict:
        context.set_response_status(400, "Bad Request", idx)
        context.set_response_content_type(idx, "application/json")
        self.count(context, "RequestsRejected", 1, Dimension("Reason", err.reason))
        return {"error": str(err), "reason": err.reason, "code": 400}

    def count(self, context, name: str, value: int, *extra: Dimension) -> None:
        # a fresh list each time: TorchServe appends default dimensions to the list it is given
        dims = [Dimension("ModelName", self.info["name"]), Dimension("Level", "Model"), *extra]
        context.metrics.add_counter(name, value, dimensions=dims)
