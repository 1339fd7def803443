"""Benchmark serving: python -m stockcast.bench (make bench)

Times the model forward alone for each export format, then starts TorchServe once per profile on
free ports and drives /predictions/lstm with wrk at each concurrency. Prints a table and writes
JSON. `baseline-torchscript` is TorchServe out of the box (TorchScript, the libraries' default
threads, no batching, TorchServe's logs), `baseline` the same with our ONNX model, `latency` and
`throughput` the profiles we ship. `--profiles all` adds `1-thread`, a step in between.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from stockcast.package import PROFILES, build_archive
from stockcast.serve import free_ports, start, stop

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
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
"""


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


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    """One wrk run against `url` with `connections` keep-alive connections for `seconds`."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    return {"concurrency": connections, **parse_wrk(out)}


def parse_wrk(out: str) -> dict:
    """wrk --latency output -> requests/s, latency percentiles (ms), errors and non-2xx answers."""
    pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, flags=re.M))  # "1.56s " too
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": to_ms(pct["50"]), "p90_ms": to_ms(pct["90"]), "p99_ms": to_ms(pct["99"]),
        "errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def bench_profile(name: str, artifacts: Path, handlers: Path, levels: list[int], seconds: int,
                  payload: str, tmp: Path) -> list[dict]:
    overrides, quiet_logs, model_format = RUNS[name]
    build_archive(artifacts, tmp / f"store-{name}", handlers=handlers, overrides=overrides,
                  model_format=model_format)
    server = start(tmp / f"store-{name}", tmp / f"server-{name}", handlers=handlers,
                   ports=free_ports(), quiet_logs=quiet_logs)
    try:
        script = tmp / "post.lua"
        script.write_text(LUA.format(body=payload))
        url = f"{server.inference}/predictions/lstm"
        run_wrk(url, script, 4, 2)  # warm-up
        rows = []
        for connections in levels:
            logs_before = sum(f.stat().st_size for f in (server.home / "logs").iterdir())
            row = {"profile": name, **run_wrk(url, script, connections, seconds)}
            logs_after = sum(f.stat().st_size for f in (server.home / "logs").iterdir())
            total = row["requests_per_s"] * seconds
            row["log_bytes_per_request"] = round((logs_after - logs_before) / max(total, 1), 1)
            rows.append(row)
            print(format_row(row), flush=True)
        return rows
    finally:
        stop(server)


def format_row(r: dict) -> str:
    return (f"{r['profile']:<20}{r['concurrency']:>4}{r['requests_per_s']:>10.0f}{r['p50_ms']:>9.2f}"
            f"{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>7}{r['non_2xx']:>8}"
            f"{r['log_bytes_per_request']:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/petr4"),
                        help="exported model to archive and serve")
    parser.add_argument("--handlers", type=Path, default=Path("handlers"),
                        help="handler, model-config.yaml and server configs")
    parser.add_argument("--profiles", default="baseline-torchscript,baseline,latency,throughput",
                        help=f"comma list of {', '.join(RUNS)}, or all")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64],
                        help="open connections, one wrk run each")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--request", type=Path, default=Path("examples/petr4_request.json"),
                        help="the JSON body sent")
    parser.add_argument("--out", type=Path, default=Path("logs/bench.json"), help="report file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: the load generator wrk is missing: apt-get install wrk")
    profiles = list(RUNS) if args.profiles == "all" else args.profiles.split(",")

    forward = time_forward(args.artifacts)
    print("model forward alone, 1 thread (us per forecast)")
    for r in forward:
        print(f"  {r['format']:<12} batch {r['batch']:>3}: {r['us_per_forecast']:>8.1f}")
    print(f"\n{'profile':<20}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'errors':>7}{'non2xx':>8}{'log B/req':>10}")
    payload = json.dumps(json.loads(args.request.read_text()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="stockcast-bench-") as tmp:
        for name in profiles:
            rows += bench_profile(name, args.artifacts, args.handlers, args.concurrency,
                                  args.seconds, payload, Path(tmp))
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "seconds_per_level": args.seconds, "forward": forward, "http": rows}
    by = {(r["profile"], r["concurrency"]): r for r in rows}
    for base in [b for b in ("baseline-torchscript", "baseline") if b in profiles]:
        for name in [p for p in PROFILES if p in profiles]:
            result[f"{name}_over_{base}"] = {
                c: round(by[name, c]["requests_per_s"] / by[base, c]["requests_per_s"], 1)
                for c in args.concurrency}
            print(f"requests/s, {name} / {base}: {result[f'{name}_over_{base}']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
