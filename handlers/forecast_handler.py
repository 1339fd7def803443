"""TorchServe handler: {"history": [closes]} -> the next `horizon` closes and, from a quantile model,
their 80% and 95% intervals; the scaler applied around the model.

It reads window, horizon and the scaler from the archive's meta.json and scaler.json (written by
stockcast.export), and turns closes into inputs and outputs into prices with stockcast_features.py
(src/stockcast/features.py, shipped in the archive): it needs neither Lightning nor stockcast.
Every request of a batch is answered on its own: a bad one gets a JSON 400 (an unexpected failure
a 500) and the others their forecasts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import stockcast_features as features  # src/stockcast/features.py, shipped beside this file
import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)
JSON_TYPES = {str: "a string", bool: "a boolean", type(None): "null", list: "an array",
              dict: "an object"}
PHRASES = {400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}
TYPES = {400: "BadRequest", 404: "NotFound", 500: "InternalServerError"}


def to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


class ForecastHandler(BaseHandler):
    class BadRequest(ValueError):  # nested: TorchServe wants exactly one class in this module
        """A request this handler refuses; `reason` labels the RequestsRejected metric."""

        def __init__(self, reason: str, message: str, code: int = 400) -> None:
            super().__init__(message)
            self.reason, self.code = reason, code

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
        # per input feature (log return; with ranges also log_range and has_range)
        self.mean = np.array(scaler["mean"], dtype=np.float64)
        self.scale = np.array(scaler["scale"], dtype=np.float64)
        self.uses_range = len(self.mean) > 1  # the request's optional high/low arrays are read
        self.window, self.horizon = int(meta["window"]), int(meta["horizon"])
        self.levels = [float(x) for x in meta.get("levels") or []]  # [] for a point model
        self.intervals = features.interval_pairs(self.levels)  # [(0.8, lower, upper), (0.95, ...)]
        settings = (context.model_yaml_config or {}).get("handler", {})
        self.max_history = int(settings.get("max_history", 10000))
        self.max_instances = int(settings.get("max_instances", 1000))
        self.max_daily_move = float(settings.get("max_daily_move", 0.69))
        self.min_price = float(settings.get("min_price", 0.000001))
        self.max_price = float(settings.get("max_price", 1000000000.0))
        self.info = {"name": context.model_name, "ticker": meta["ticker"],
                     "version": context.manifest["model"].get("modelVersion", "")}
        self.failures_logged: set[str] = set()
        self.own_status = True  # per batch: False while answering the instances of one request
        self.announce(context, meta, model_dir)
        self.width_every_s, self.width_sent_at = float(settings.get("width_every_s", 1.0)), -math.inf
        # the worker logs a line per request at INFO on the root logger; ts.metrics must stay at
        # INFO: its lines carry ForecastsServed and RequestsRejected to the frontend
        logging.getLogger().setLevel(settings.get("log_level", "WARNING"))
        logging.getLogger("ts.metrics").setLevel(logging.INFO)
        # the worker's own JSON decoding logs a ~2 KB traceback for every invalid body; with this
        # (read by TorchServe's protocol code at each request) bodies arrive as bytes and parse()
        # decodes them, answering 400 without a log line
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
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

    def announce(self, context, meta: dict, model_dir: Path) -> None:
        """Metrics of this worker's start: which model it serves (ModelTrainedThrough: the date of
        the last close the model was trained on, labelled with version, ticker and horizon) and
        WorkerStarts, Start="restart" when a worker died and this one replaces it (also a warning
        in the log)."""
        through = meta.get("data", {}).get("through")
        if through:
            seconds = (np.datetime64(str(through)[:10], "s") - np.datetime64(0, "s")).astype(float)
            context.metrics.add_metric(
                "ModelTrainedThrough", float(seconds), unit="seconds", metric_type=MetricTypes.GAUGE,
                dimensions=self.dimensions(Dimension("Ticker", meta["ticker"]),
                                           Dimension("Horizon", str(self.horizon)),
                                           Dimension("TrainedThrough", str(through)[:10])))
        # the frontend restarts a dead worker on the same socket, and the model's folder outlives
        # its workers: a marker per socket there tells a restart from a first start
        argv = sys.argv
        socket = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--sock-name", "--port")), "")
        start = "initial"
        if socket:
            try:
                (model_dir / f".worker-started-{Path(socket).name}").touch(exist_ok=False)
            except FileExistsError:
                start = "restart"
                # on stderr, which the frontend logs at WARN (stdout lines are INFO)
                print(f"WARNING: a worker of {self.info['name']} (version {self.info['version']}) restarted "
                      f"on {Path(socket).name}: the one before it died", file=sys.stderr, flush=True)
            except OSError:  # a read-only model folder: every start counts as a first one
                pass
        self.count(context, "WorkerStarts", 1, Dimension("Start", start))

    def body(self, row: dict):
        """One request (or, under a KServe envelope, one instance) -> its decoded JSON body."""
        body = row.get("data") if row.get("data") is not None else row.get("body")
        if body is None and "history" in row:  # KServe v1 (TS_SERVICE_ENVELOPE=kserve): an instance
            body = row
        elif isinstance(row.get("datatype"), str) and isinstance(body, list):  # KServe v2: an input
            body = {"history": self.v2_history(row)}
        if isinstance(body, (bytes, bytearray, str)):
            body = self.decode(body)
        if body is None:  # also what a form-encoded body (curl -d without a Content-Type) becomes
            raise self.BadRequest("empty_body", 'no JSON body: send {"history": [closes]} with '
                                                "Content-Type: application/json")
        return body

    def decode(self, body: bytes | bytearray | str):
        """A JSON text -> its value; BadRequest if it is empty or not JSON."""
        try:  # ~7x faster than json for 1,000 histories; it refuses NaN, Infinity and integers
            return orjson.loads(body)  # beyond 64 bits, which json below reads for their message
        except orjson.JSONDecodeError:
            pass
        if isinstance(body, (bytes, bytearray)):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                raise self.BadRequest("invalid_json", "body is not valid UTF-8") from None
        if not body.strip():
            raise self.BadRequest("empty_body", 'empty body: send {"history": [closes]}')
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise self.BadRequest("invalid_json", "body is not valid JSON") from None

    def days(self, body) -> np.ndarray:
        """One history -> float64 [3, T]: its last `window` closes, highs and lows (NaN when the
        request has none or the model does not read them), or BadRequest."""
        if not isinstance(body, dict):
            raise self.BadRequest("not_object", 'a forecast request is a JSON object: {"history": [closes]}')
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
        self.check_numbers("history", history)
        closes = self.check_prices(history)[-self.window :]
        high = low = np.full(self.window, np.nan)
        if self.uses_range and ("high" in body or "low" in body):
            high, low = self.parse_range(body, len(history))
        return np.stack([closes, high[-self.window :], low[-self.window :]])

    def v2_history(self, tensor: dict) -> list:
        """A KServe v2 input tensor (TS_SERVICE_ENVELOPE=kservev2): one history, shape [T] or [1, T]."""
        shape, data = tensor.get("shape"), tensor["data"]
        if len(data) == 1 and isinstance(data[0], list):
            data = data[0]
        if not isinstance(shape, list) or shape[-1:] != [len(data)] or any(n != 1 for n in shape[:-1]):
            raise self.BadRequest("bad_shape", f"a v2 input is one history of closes, shape [T] or [1, T]; "
                                               f"got shape {shape}")
        return data

    def check_numbers(self, key: str, values: list) -> None:
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = JSON_TYPES.get(type(value), type(value).__name__)
                raise self.BadRequest("not_number", f"{key}[{i}] is not a number but {kind}")

    def parse_range(self, body: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The optional "high" and "low" arrays, aligned with "history": both or neither."""
        if "high" not in body or "low" not in body:
            given, missing = ("high", "low") if "high" in body else ("low", "high")
            raise self.BadRequest("range_incomplete", f'"{given}" needs "{missing}" too (each day\'s range), '
                                  "or send neither")
        arrays = []
        for key in ("high", "low"):
            values = body[key]
            if not isinstance(values, list) or len(values) != n:
                raise self.BadRequest("range_misaligned", f'"{key}" must be a list as long as "history" '
                                      f"({n}), one value per day")
            self.check_numbers(key, values)
            with np.errstate(over="ignore"):
                arrays.append(np.array([to_float(v) for v in values], dtype=np.float64))
        high, low = arrays
        # the prices' own bounds, and a day's range within the bound on a day's move; the closes
        # are not required to lie inside it: adjusted closes with unadjusted highs and lows (the
        # classic Yahoo export) are off by the adjustment factor, and only high / low is read
        with np.errstate(invalid="ignore", divide="ignore"):
            bad = ~(features.usable_range(high, low) & (low >= self.min_price) & (high <= self.max_price)
                    & (np.log(high / low) <= self.max_daily_move))
        if bad.any():
            i = int(np.argmax(bad))
            raise self.BadRequest("implausible_range", f"day {i}: high {high[i]:.6g} and low {low[i]:.6g} "
                                  "are not a range (0 < low <= high, within a factor "
                                  f"e^{self.max_daily_move}, "
                                  f"prices {self.min_price:g} .. {self.max_price:g})")
        return high, low

    def check_prices(self, history: list[int | float]) -> np.ndarray:
        """Numbers -> float64 closes, refused unless finite, in the price range and moving plausibly."""
        try:
            closes = np.array(history, dtype=np.float64)
        except OverflowError:  # an integer literal too large for a float (JSON has no limit)
            closes = np.array([to_float(v) for v in history], dtype=np.float64)

        def first(bad: np.ndarray) -> int | None:
            return int(np.argmax(bad)) if bad.any() else None

        # Python's JSON parser accepts NaN, Infinity and 1e999
        if (i := first(~np.isfinite(closes))) is not None:
            raise self.BadRequest("not_finite", f"history[{i}] is not a finite number")
        if (i := first(closes <= 0)) is not None:
            raise self.BadRequest("not_positive", f"history[{i}] must be a positive price, got {history[i]}")
        if (i := first((closes < self.min_price) | (closes > self.max_price))) is not None:
            raise self.BadRequest("implausible_price", f"history[{i}] = {history[i]} is outside the "
                                  f"plausible prices {self.min_price:g} .. {self.max_price:g}")
        # a bound on moves, not levels, so scaling every close by k changes nothing: a close about
        # 2x or 0.5x the one before is a data error (an unadjusted split, a typo), not a market
        moves = np.abs(np.diff(np.log(closes)))
        if (i := first(moves > self.max_daily_move)) is not None:
            raise self.BadRequest(
                "implausible_move", f"history[{i + 1}] = {history[i + 1]} moves {moves[i]:.2f} in log "
                f"price from history[{i}] = {history[i]}; the limit is {self.max_daily_move} "
                "(unadjusted split or a typo?)")
        return closes

    def forecast(self, days: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """[B, 3, T] closes, highs and lows -> ([B, H] forecast closes, [B, H, Q] quantile closes or None)."""
        closes = days[:, 0]
        x = features.to_inputs(closes, self.mean, self.scale, days[:, 1], days[:, 2])  # [B, T-1, F]
        if self.session is not None:
            y = self.session.run(None, {"x": x})[0]  # [B, H] or [B, H, Q]
        else:
            with torch.inference_mode():
                y = self.model(torch.from_numpy(x)).numpy()
        # inf: answer() refuses
        return features.to_forecasts(closes[:, -1], y, self.mean[0], self.scale[0], self.levels)

    def handle(self, data: list[dict], context) -> list:
        """One response per request: a forecast, {"predictions": [...]} for a request of
        {"instances": [...]}, or an error object with a status of its own. Under a KServe envelope
        `data` holds one request's instances: one result per instance, which the envelope wraps."""
        began = time.perf_counter()
        self.context = context
        self.tally: Counter = Counter()  # (metric, reason) -> count, one metric line each per batch
        results = self.results(data, context)
        for (name, reason), n in self.tally.items():
            self.count(context, name, n, *([Dimension("Reason", reason)] if reason else []))
        # HandlerLatency: this batch's time in the handler, in units of 10 ms: TorchServe 0.12 builds
        # histograms with the Prometheus client's default buckets (0.005 .. 10), which then span
        # 0.05 .. 100 ms (multiply by 10 for ms). One line per batch (~0.1 ms).
        context.metrics.add_metric("HandlerLatency", round((time.perf_counter() - began) * 100, 6),
                                   unit="10ms", dimensions=self.dimensions(),
                                   metric_type=MetricTypes.HISTOGRAM)
        # JSON bytes: TorchServe's own encoding indents, ~80x slower and 2x larger. Only for rows as
        # they come off the wire (a body left undecoded is bytes); under a KServe envelope a row is a
        # decoded instance (v1) or tensor (v2), which the envelope wraps: objects, not bytes
        if data and all(isinstance(row, dict)
                        and isinstance(row.get("body", row.get("data")), (bytes, bytearray)) for row in data):
            return [orjson.dumps(r) for r in results]
        return results

    def results(self, data: list[dict] | None, context) -> list[dict]:
        if not data:  # what a KServe envelope passes on for a request without "instances"
            self.own_status = False
            context.set_response_status(400, PHRASES[400], 0)
            return [self.error(self.BadRequest(
                "no_instances", 'no instances: send {"instances": [{"history": [closes]}, ...]}'))]
        requests = len(context.request_ids or {0: None})
        # statuses and headers are a request's: one request's instances (a KServe envelope) have none
        self.own_status = len(data) <= requests
        # per request: its result, or a list with one per instance for {"instances": [...]};
        # every history of the batch is forecast in one forward pass
        results: list = [None] * len(data)
        good: dict[tuple[int, int | None], np.ndarray] = {}  # (request, instance or None) -> [3, T]
        for i, row in enumerate(data):
            try:
                if context.get_request_header(min(i, requests - 1), "explain") == "True":
                    raise self.BadRequest("no_explanations", "this model has no explanations: "
                                          "POST /predictions/<model>", code=404)
                body = self.body(row)
                if self.own_status and isinstance(body, dict) and "instances" in body:
                    results[i] = []
                    for j, days in enumerate(self.many_days(self.instances(body))):
                        if isinstance(days, Exception):
                            results[i].append(self.error(days))
                        else:
                            results[i].append(None)
                            good[i, j] = days
                else:
                    good[i, None] = self.days(body)
            except Exception as err:  # noqa: BLE001 - each request fails alone, whatever the cause
                results[i] = self.error(err)
        answers = self.answers(good)
        for (i, j), answer in answers.items():
            if j is None:
                results[i] = answer
            else:
                results[i][j] = answer
        for i, result in enumerate(results):
            if isinstance(result, list):
                # 200 once the list was read, each item with its own code: a 4xx comes with
                # Connection: close, and TorchServe cut such answers short (1,000 errors, ~160 KB)
                results[i], code = {"predictions": result}, 200
            else:
                code = result.get("code", 200)
            if self.own_status:
                context.set_response_status(code, PHRASES.get(code, "OK"), i)
                context.set_response_content_type(i, "application/json")
        if not self.own_status and all("forecast" not in r for r in results) and all(
                isinstance(row, dict) and "datatype" in row for row in data):
            # a KServe v2 request, one history per tensor, none answered: a (short) 4xx of its own
            context.set_response_status(results[0]["code"], PHRASES[results[0]["code"]], 0)
        return results

    def instances(self, body: dict) -> list:
        """The instances of {"instances": [...]}: a non-empty list of at most `max_instances`."""
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise self.BadRequest("no_instances", '"instances" must be a non-empty list of '
                                  '{"history": [closes]} objects')
        if len(instances) > self.max_instances:
            raise self.BadRequest("too_many_instances", f'{len(instances)} instances; the maximum per '
                                  f"request is {self.max_instances}: split them")
        return instances

    def many_days(self, instances: list) -> list:
        """Each instance -> [3, T] days, or the BadRequest that refuses it. Plain histories of one
        length are checked as one array (1,000 in ~5 ms, not ~50); any other instance, and any
        that fails those checks, one by one, for the message naming its problem."""
        histories = [x.get("history") if isinstance(x, dict) and len(x) == 1 else None for x in instances]
        lengths = {len(h) if isinstance(h, list) else -1 for h in histories}
        fast = None
        if len(lengths) == 1 and self.window <= (n := lengths.pop()) <= self.max_history:
            # bool is not an int here: type(), not isinstance
            if set(map(type, itertools.chain.from_iterable(histories))) <= {float, int}:
                try:
                    closes = np.array(histories, dtype=np.float64)  # [N, T]
                except OverflowError:  # an integer literal too large for a float
                    closes = None
                if closes is not None:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        fast = (np.isfinite(closes) & (closes >= self.min_price)
                                & (closes <= self.max_price)).all(axis=1)
                        if n > 1:
                            moves = np.abs(np.diff(np.log(closes), axis=1))
                            fast &= (moves <= self.max_daily_move).all(axis=1)
                    days = np.full((len(instances), 3, self.window), np.nan)
                    days[:, 0] = closes[:, -self.window :]
        out: list = []
        for k, instance in enumerate(instances):
            if fast is not None and fast[k]:
                out.append(days[k])
                continue
            try:
                out.append(self.days(instance))
            except Exception as err:  # noqa: BLE001 - each instance fails alone
                out.append(err)
        return out

    def answers(self, good: dict) -> dict:
        """(request, instance) -> its forecast object (or error object), all in one forward pass;
        if that fails, one by one, so a history that breaks the model fails alone."""
        if not good:
            return {}
        keys = list(good)
        try:
            point, quantiles = self.forecast(np.stack([good[k] for k in keys]))
        except Exception:  # noqa: BLE001 - find the history that breaks it: one by one
            out = {}
            for k in keys:
                try:
                    point, quantiles = self.forecast(good[k][None])
                    out[k] = self.one(point[0], None if quantiles is None else quantiles[0])
                except Exception as err:  # noqa: BLE001
                    out[k] = self.error(err)
            self.served(good, out)
            return out
        # Python lists at once: ndarray.tolist per forecast costs more than the forward pass
        points, bounds = point.tolist(), None
        finite = np.isfinite(point).all(axis=1)
        if quantiles is not None:
            steps = range(quantiles.shape[1])
            bounds = [[(level, [q[h][lo] for h in steps], [q[h][hi] for h in steps])
                       for level, lo, hi in self.intervals] for q in quantiles.tolist()]
            finite &= np.isfinite(quantiles).all(axis=(1, 2))
        out = {k: self.answer(points[n], bounds and bounds[n]) if finite[n] else self.overflow()
               for n, k in enumerate(keys)}
        self.served(good, out)
        return out

    def served(self, good: dict, out: dict) -> None:
        keys = [k for k, answer in out.items() if "forecast" in answer]
        if keys:
            self.tally["ForecastsServed", None] += len(keys)
            self.track_widths([out[k] for k in keys], [good[k][0, -1] for k in keys])

    def one(self, forecast: np.ndarray, quantiles: np.ndarray | None) -> dict:
        """[H] closes and [H, Q] quantile closes (or None) -> the response object."""
        if not np.isfinite(forecast).all() or (quantiles is not None and not np.isfinite(quantiles).all()):
            return self.overflow()
        bounds = None if quantiles is None else [(level, quantiles[:, lo].tolist(), quantiles[:, hi].tolist())
                                                 for level, lo, hi in self.intervals]
        return self.answer(forecast.tolist(), bounds)

    def answer(self, forecast: list[float], bounds: list[tuple] | None) -> dict:
        """Forecast closes and [(level, lower closes, upper closes)] (or None) -> the response object."""
        out = {"prediction": forecast[0], "forecast": forecast, "window": self.window,
               "horizon": self.horizon, "model": self.info}
        if bounds is not None:
            out["intervals"] = [{"level": level, "lower": lower, "upper": upper}
                                for level, lower, upper in bounds]
        return out

    def overflow(self) -> dict:  # finite prices whose forecast overflows
        return self.error(self.BadRequest("forecast_overflow",
                                          "prices too large: the forecast is not finite"))

    def track_widths(self, answers: list[dict], last_closes: list[float]) -> None:
        """IntervalWidth: the mean width of a batch's first-step intervals in % of the last close,
        per nominal level; it follows market volatility (and jumps with it). A gauge Prometheus
        reads every 15 s needs no value per request: at most one per `width_every_s` per worker
        (each metric line costs ~0.1 ms of a request's latency)."""
        now = time.monotonic()
        if not self.intervals or now - self.width_sent_at < self.width_every_s:
            return
        self.width_sent_at = now
        for k, (level, _, _) in enumerate(self.intervals):
            width = np.mean([(a["intervals"][k]["upper"][0] - a["intervals"][k]["lower"][0]) / last
                             for a, last in zip(answers, last_closes, strict=True)])
            self.context.metrics.add_metric("IntervalWidth", round(100 * float(width), 4), unit="percent",
                                       dimensions=self.dimensions(Dimension("Interval", f"{100 * level:g}")),
                                       metric_type=MetricTypes.GAUGE)

    def error(self, err: Exception) -> dict:
        """The error object of one request or instance: TorchServe's {code, type, message} plus our
        reason; counted in RequestsRejected (the client's fault) or RequestsFailed (ours)."""
        if isinstance(err, self.BadRequest):
            code, reason, message = err.code, err.reason, str(err)
            self.tally["RequestsRejected", reason] += 1
        else:  # a bug, not the client's fault: logged once per kind, so no client can flood the log
            code, reason, message = 500, "internal_error", "internal error while forecasting"
            kind = type(err).__name__
            if kind not in self.failures_logged:
                self.failures_logged.add(kind)
                log.error("a request failed (each kind of failure is logged once): %s: %s", kind,
                          str(err)[:300], exc_info=err)
            self.tally["RequestsFailed", kind] += 1
        return {"code": code, "type": TYPES[code], "message": message, "error": message,
                "reason": reason}

    def count(self, context, name: str, value: int, *extra: Dimension) -> None:
        context.metrics.add_counter(name, value, dimensions=self.dimensions(*extra))

    def dimensions(self, *extra: Dimension) -> list[Dimension]:
        # a fresh list each time: TorchServe appends default dimensions to the list it is given
        return [Dimension("ModelName", self.info["name"]), Dimension("Level", "Model"),
                Dimension("ModelVersion", self.info["version"]), *extra]
