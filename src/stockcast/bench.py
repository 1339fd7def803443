"""Benchmark serving: python -m stockcast.bench (make bench)

Times the model forward alone for each export format, then starts TorchServe once per profile on
free ports and drives /predictions/lstm with wrk at each concurrency. Prints a table and writes
JSON after every level, so a run that stops keeps what it measured. A profile that cannot be
measured (the server does not start, wrk fails, nothing answered 2xx) is reported as failed with
its reason and the run goes on; the exit code is then 1. `baseline-torchscript` is TorchServe out
of the box (TorchScript, the libraries' default threads, no batching, TorchServe's logs),
`baseline` the same with our ONNX model, `latency` and `throughput` the profiles we ship.
`--profiles all` adds `1-thread`, a step in between.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stockcast.package import PROFILES, build_archive
from stockcast.serve import Server, free_ports, start, stop

# out-of-the-box TorchServe as overrides of model-config.yaml: one worker per core, no batching,
# the libraries' default threads, TorchServe's logs; then one step; then ours (latency adds quiet
# logs, throughput adds batching). Each run: (model-config overrides, quiet logs, model format).
OUT_OF_THE_BOX = {"batchSize": None, "maxBatchDelay": None, "minWorkers": None, "maxWorkers": None,
                  "handler": {"threads": 0, "log_level": "INFO"}}
RUNS = {
    "baseline-torchscript": (OUT_OF_THE_BOX, False, "torchscript"),  # TorchServe out of the box
    "baseline": (OUT_OF_THE_BOX, False, "onnx"),
    "1-thread": ({**OUT_OF_THE_BOX, "handler": {"log_level": "INFO"}}, False, "onnx"),
    **{name: (overrides, True, "onnx") for name, overrides in PROFILES.items()},
}


class BenchError(Exception):
    """A level or profile that could not be measured; the message is the reason reported."""


def lua_string(text: str) -> str:
    """`text` as a Lua string literal (decimal escapes: wrk's LuaJIT has no \\u)."""
    return '"' + "".join(f"\\{ord(c):03d}" if c in '"\\\n\r\0' else c for c in text) + '"'


def wrk_script(payload: str, headers: dict[str, str]) -> str:
    """wrk's Lua setup: POST `payload` as JSON with `headers` (the token, when the server has one)."""
    headers = {"Content-Type": "application/json", **headers}
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(payload)}"]
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def time_forward(artifacts: Path, batches=(1, 32), repeat: float = 1.0) -> list[dict]:
    """µs per forecast of the exported model alone, one thread, per format and batch size."""
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(artifacts / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(artifacts / "model.pt"))
    window = json.loads((artifacts / "meta.json").read_text())["window"]
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).normal(size=(batch, window - 1, 1)).astype(np.float32)
        xt = torch.from_numpy(x)
        runs = {"onnxruntime": lambda x=x: session.run(None, {"x": x}),
                "torchscript": lambda xt=xt: scripted(xt)}
        for name, run in runs.items():
            with torch.inference_mode():
                for _ in range(20):
                    run()
                n, start_t = 0, time.perf_counter()
                while time.perf_counter() - start_t < repeat:
                    run()
                    n += 1
                elapsed = time.perf_counter() - start_t
            rows.append({"format": name, "batch": batch,
                         "us_per_forecast": round(elapsed / n / batch * 1e6, 1)})
    return rows


def to_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def parse_wrk(out: str) -> dict:
    """wrk --latency output -> requests, requests/s, latency percentiles (ms), socket errors and
    non-2xx answers; BenchError if it is not such a report or nothing was answered 2xx (then the
    percentiles and "0 errors" would describe nothing)."""
    try:
        pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, flags=re.M))  # "1.56s " too
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        row = {
            "requests": int(re.search(r"^\s*(\d+) requests in ", out, flags=re.M).group(1)),
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": to_ms(pct["50"]), "p90_ms": to_ms(pct["90"]), "p99_ms": to_ms(pct["99"]),
            "errors": sum(int(g) for g in errors.groups()) if errors else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        }
    except (AttributeError, KeyError, ValueError):  # a missing line or a value in another shape
        first = out.strip().splitlines()[0][:80] if out.strip() else ""
        raise BenchError(f"unparsable wrk output (starts {first!r})") from None
    if row["requests"] <= row["non_2xx"]:
        raise BenchError(f"0 requests served: {row['requests']} answered, {row['non_2xx']} of them "
                         f"not 2xx, {row['errors']} socket errors")
    return row


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    """One wrk run against `url` with `connections` keep-alive connections for `seconds`."""
    try:
        done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                               "-s", str(script), url],
                              capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + 30} s") from None
    if done.returncode:
        last = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise BenchError(f"wrk failed (exit {done.returncode}): {last[-1]}")
    return {"concurrency": connections, **parse_wrk(done.stdout)}


class Report:
    """The JSON report, rewritten whole after every change: a run that stops keeps its levels."""

    def __init__(self, path: Path, **header):
        self.path = path
        self.data = {**header, "http": [], "failed": []}

    def add(self, row: dict) -> None:
        self.data["http"].append(row)
        self.write()

    def fail(self, profile: str, reason: str) -> None:
        self.data["failed"].append({"profile": profile, "reason": reason})
        self.write()

    def write(self) -> None:
        self.data.update(ratios(self.data["http"]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        partial.replace(self.path)  # a reader never sees a half-written file


def ratios(rows: list[dict]) -> dict[str, dict[int, float]]:
    """requests/s of each shipped profile over each baseline, at the levels both measured."""
    by = {(r["profile"], r["concurrency"]): r["requests_per_s"] for r in rows}
    found = {}
    for base in ("baseline-torchscript", "baseline"):
        for name in PROFILES:
            pairs = {c: by[name, c] / by[base, c] for p, c in by
                     if p == name and by.get((base, c))}  # a base of 0 req/s has no ratio
            if pairs:
                found[f"{name}_over_{base}"] = {c: round(v, 1) for c, v in pairs.items()}
    return found


def bench_levels(name: str, levels: list[int], measure: Callable[[int], dict], report: Report) -> None:
    """measure(connections) for each level, each row reported as soon as it is measured."""
    for connections in levels:
        try:
            row = {"profile": name, **measure(connections)}
        except BenchError as e:
            raise BenchError(f"concurrency {connections}: {e}") from None
        report.add(row)
        print(format_row(row), flush=True)


def log_bytes(server: Server) -> int:
    return sum(f.stat().st_size for f in (server.home / "logs").iterdir() if f.is_file())


def bench_profile(name: str, artifacts: Path, handlers: Path, levels: list[int], seconds: int,
                  payload: str, tmp: Path, report: Report) -> None:
    """Archive, start, warm up and measure one profile; BenchError with the reason if it cannot."""
    overrides, quiet_logs, model_format = RUNS[name]
    try:
        build_archive(artifacts, tmp / f"store-{name}", handlers=handlers, overrides=overrides,
                      model_format=model_format)
        server = start(tmp / f"store-{name}", tmp / f"server-{name}", handlers=handlers,
                       ports=free_ports(), quiet_logs=quiet_logs)
    except (RuntimeError, OSError, ValueError, subprocess.CalledProcessError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # start() may put the console log's tail under its first line: keep the first and last
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
        log = (tmp / f"server-{name}" / "logs" / "console.log").resolve()
        if log.exists():  # `tmp` goes at the end of the run: keep the log the reason points to
            kept = report.path.with_name(f"{report.path.stem}-{name}-console.log")
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, kept)
            reason = reason.replace(str(log), str(kept))
        raise BenchError(f"server did not start: {reason}") from None
    try:
        script = tmp / f"post-{name}.lua"
        script.write_text(wrk_script(payload, server.headers()))
        url = f"{server.inference}/predictions/lstm"
        try:
            run_wrk(url, script, 4, 2)
        except BenchError as e:
            raise BenchError(f"warm-up: {e}") from None

        def measure(connections: int) -> dict:
            before = log_bytes(server)
            row = run_wrk(url, script, connections, seconds)
            row["log_bytes_per_request"] = round((log_bytes(server) - before) / row["requests"], 1)
            return row

        bench_levels(name, levels, measure, report)
    finally:
        stop(server)


def run_profiles(profiles: list[str], bench_one: Callable[[str], None], report: Report) -> list[str]:
    """bench_one(profile) for each profile, going on after a failure; the profiles that failed."""
    failed = []
    for name in profiles:
        try:
            bench_one(name)
        except BenchError as e:
            print(f"{name:<20}FAILED: {e}", flush=True)
            report.fail(name, str(e))
            failed.append(name)
    return failed


def format_row(r: dict) -> str:
    return (f"{r['profile']:<20}{r['concurrency']:>4}{r['requests_per_s']:>10.0f}{r['p50_ms']:>9.2f}"
            f"{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>7}{r['non_2xx']:>8}"
            f"{r['log_bytes_per_request']:>10}")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number >= 1: {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/petr4"),
                        help="exported model to archive and serve")
    parser.add_argument("--handlers", type=Path, default=Path("handlers"),
                        help="handler, model-config.yaml and server configs")
    parser.add_argument("--profiles", default="baseline-torchscript,baseline,latency,throughput",
                        help=f"comma list of {', '.join(RUNS)}, or all")
    parser.add_argument("--concurrency", type=positive, nargs="+", default=[1, 16, 64],
                        help="open connections, one wrk run each")
    parser.add_argument("--seconds", type=positive, default=10, help="length of each wrk run")
    parser.add_argument("--request", type=Path, default=Path("examples/petr4_request.json"),
                        help="the JSON body sent")
    parser.add_argument("--out", type=Path, default=Path("logs/bench.json"),
                        help="report file, rewritten after every level")
    args = parser.parse_args(argv)
    profiles = list(RUNS) if args.profiles == "all" else args.profiles.split(",")
    unknown = [p for p in profiles if p not in RUNS]
    if unknown:
        parser.error(f"unknown profile {unknown[0]!r}: choose from {', '.join(RUNS)}, or all")
    missing = [f for f in ("model.onnx", "model.pt", "meta.json") if not (args.artifacts / f).is_file()]
    if missing:
        raise SystemExit(f"error: {args.artifacts / missing[0]} is missing: train first (make train)")
    try:
        payload = json.dumps(json.loads(args.request.read_text()))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read the request {args.request}: {e}") from None
    if shutil.which("wrk") is None:
        raise SystemExit("error: the load generator wrk is missing: apt-get install wrk")

    forward = time_forward(args.artifacts)
    report = Report(args.out, machine={"cpus": os.cpu_count(), "python": platform.python_version()},
                    seconds_per_level=args.seconds, forward=forward)
    report.write()
    print("model forward alone, 1 thread (us per forecast)")
    for r in forward:
        print(f"  {r['format']:<12} batch {r['batch']:>3}: {r['us_per_forecast']:>8.1f}")
    print(f"\n{'profile':<20}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'errors':>7}{'non2xx':>8}{'log B/req':>10}")
    with tempfile.TemporaryDirectory(prefix="stockcast-bench-") as tmp:
        failed = run_profiles(profiles, lambda name: bench_profile(
            name, args.artifacts, args.handlers, args.concurrency, args.seconds, payload, Path(tmp),
            report), report)
    for key, value in ratios(report.data["http"]).items():
        print(f"requests/s, {key.replace('_over_', ' / ')}: {value}")
    print(f"written to {args.out}")
    if failed:
        print(f"bench: FAILED: {', '.join(failed)} (reasons above and in {args.out})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
