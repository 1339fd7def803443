"""Benchmark serving: python -m stockcast.bench (make bench)

Times the model forward alone for each export format, then starts TorchServe once per profile on
free ports and drives /predictions/lstm with wrk at each concurrency; then, with --many N, with one
body of N histories per call at concurrency 1, 2 and 4 (forecasts/s = requests/s x N). Prints a
table and writes JSON after every level, so a run that stops keeps what it measured. A profile that
cannot be measured (the server does not start, wrk fails, nothing answered 2xx, a many-per-call
body refused) is reported as failed with its reason and the run goes on; the exit code is then 1.
`latency` and `throughput` are the profiles we ship, `peer` FastAPI + uvicorn + ONNX Runtime on
the same model (stockcast.bench_peer): each shipped profile's requests/s over the peer's and both
p99s are in `vs_peer`. `baseline-torchscript` is TorchServe out of the box (TorchScript, the
libraries' default threads, no batching, TorchServe's logs), `baseline` the same with our ONNX
model, `1-thread` a step in between: `--profiles all` adds them.
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
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stockcast import bench_peer
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
PEER = "peer"  # FastAPI + uvicorn + ONNX Runtime (stockcast.bench_peer), not TorchServe
CHOICES = [*RUNS, PEER]
MANY_LEVELS = (1, 2, 4)  # connections for the many-per-call bodies (each a whole batch)
TORCHSERVE_MAX_REQUEST = 6553500  # bytes, when config.properties sets no max_request_size


@dataclass
class Plan:
    """What every profile is driven with: the single-forecast body at `levels` connections for
    `seconds` each, then (unless `instances` is 0) `many`, a body of that many histories."""

    levels: list[int]
    seconds: int
    payload: str
    instances: int = 0
    many: str = ""
    warmup: int = 2  # seconds at concurrency 16 before the first level


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


def many_body(request: dict, n: int) -> str:
    """{"instances": [...]} of `n` copies of the request's history, the i-th scaled by 1 + i/n (6
    significant digits): distinct, and as valid as the original, since only returns reach the model."""
    closes = request["history"]
    instances = [{"history": [float(f"{c * (1 + i / n):.6g}") for c in closes]} for i in range(n)]
    return json.dumps({"instances": instances}, separators=(",", ":"))


def max_request_size(handlers: Path) -> int:
    """TorchServe's body limit in bytes, from handlers/config.properties (serve.start keeps it)."""
    found = re.search(r"^max_request_size=(\d+)\s*$", (handlers / "config.properties").read_text(), re.M)
    return int(found.group(1)) if found else TORCHSERVE_MAX_REQUEST


def check_many(url: str, headers: dict[str, str], body: str, n: int, limit: int | None) -> None:
    """BenchError with the reason unless the server takes `body` and answers all `n` forecasts."""
    size = len(body.encode())
    if limit is not None and size > limit:
        raise BenchError(f"{n} per call: the body is {size:,} bytes, over TorchServe's max_request_size "
                         f"of {limit:,} (handlers/config.properties)")
    request = urllib.request.Request(url, body.encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    except OSError as e:
        raise BenchError(f"{n} per call: no answer ({e})") from None
    try:
        answered = sum("forecast" in p for p in json.loads(text)["predictions"])
    except (ValueError, KeyError, TypeError):
        answered = 0
    if status != 200 or answered != n:
        raise BenchError(f"{n} per call: answered {status} with {answered} of {n} forecasts "
                         f"({text.strip()[:160] or 'empty body'})")


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
        self.data.update(ratios(self.data["http"]), vs_peer=vs_peer(self.data["http"]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        partial.replace(self.path)  # a reader never sees a half-written file


def ratios(rows: list[dict]) -> dict[str, dict[int, float]]:
    """requests/s of each shipped profile over each baseline, at the levels both measured;
    `_many<N>` for the bodies of N histories."""
    by = {(r["profile"], r["concurrency"], r.get("instances", 1)): r["requests_per_s"] for r in rows}
    found = {}
    for base in ("baseline-torchscript", "baseline"):
        for name in PROFILES:
            for n in sorted({n for _, _, n in by}):
                pairs = {c: by[name, c, n] / by[base, c, n] for p, c, m in by
                         if (p, m) == (name, n) and by.get((base, c, n))}  # a base of 0 req/s: none
                if pairs:
                    key = f"{name}_over_{base}" + (f"_many{n}" if n > 1 else "")
                    found[key] = {c: round(v, 1) for c, v in pairs.items()}
    return found


def vs_peer(rows: list[dict]) -> list[dict]:
    """Each shipped profile against the peer at each level both measured: requests/s over the
    peer's, and both p99s."""
    peer = {(r["concurrency"], r.get("instances", 1)): r for r in rows if r["profile"] == PEER}
    found = []
    for r in rows:
        base = peer.get((r["concurrency"], r.get("instances", 1)))
        if r["profile"] in PROFILES and base and base["requests_per_s"]:
            found.append({"profile": r["profile"], "concurrency": r["concurrency"],
                          "instances": r.get("instances", 1),
                          "requests_per_s_ratio": round(r["requests_per_s"] / base["requests_per_s"], 2),
                          "p99_ms": r["p99_ms"], "peer_p99_ms": base["p99_ms"]})
    return found


def bench_levels(name: str, levels: list[int], measure: Callable[[int], dict], report: Report,
                 what: str = "") -> None:
    """measure(connections) for each level, each row reported as soon as it is measured; `what`
    prefixes the reason a level fails."""
    for connections in levels:
        try:
            row = {"profile": name, **measure(connections)}
        except BenchError as e:
            raise BenchError(f"{what}concurrency {connections}: {e}") from None
        report.add(row)
        print(format_row(row), flush=True)


def log_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def start_torchserve(name: str, artifacts: Path, handlers: Path, tmp: Path, report: Report):
    """Archive the profile and start TorchServe on free ports; BenchError with the reason if it cannot."""
    overrides, quiet_logs, model_format = RUNS[name]
    try:
        build_archive(artifacts, tmp / f"store-{name}", handlers=handlers, overrides=overrides,
                      model_format=model_format)
        return start(tmp / f"store-{name}", tmp / f"server-{name}", handlers=handlers,
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


def bench_profile(name: str, artifacts: Path, handlers: Path, plan: Plan, tmp: Path, report: Report) -> None:
    """Start one profile's server (TorchServe, or the peer), warm it up, measure it, stop it by the
    process group it was started in; BenchError with the reason if it cannot be measured."""
    if name == PEER:
        try:
            server = bench_peer.start(artifacts, tmp / PEER, free_ports(1)[0])
        except (RuntimeError, OSError) as e:
            raise BenchError(f"server did not start: {e}") from None
        halt, logs, limit = bench_peer.stop, server.log.parent, None
    else:
        server = start_torchserve(name, artifacts, handlers, tmp, report)
        halt, logs, limit = stop, server.home / "logs", max_request_size(handlers)
    try:
        url = f"{server.inference}/predictions/lstm"
        script = tmp / f"post-{name}.lua"
        script.write_text(wrk_script(plan.payload, server.headers()))
        try:  # Java's JIT compiles the request path for ~20 s after a start, taking a core's
            # fifth: measured before it is done, c1 p99 was 5.8-8.7 ms, after it 2-5 ms
            run_wrk(url, script, 16, plan.warmup)
        except BenchError as e:
            raise BenchError(f"warm-up: {e}") from None

        def measure(connections: int, script: Path = script, instances: int = 1) -> dict:
            before = log_bytes(logs)
            row = run_wrk(url, script, connections, plan.seconds)
            row = {"concurrency": connections, "instances": instances, **row}
            if instances > 1:
                row["forecasts_per_s"] = round(row["requests_per_s"] * instances, 1)
            row["log_bytes_per_request"] = round((log_bytes(logs) - before) / row["requests"], 1)
            return row

        bench_levels(name, plan.levels, measure, report)
        if plan.instances:
            check_many(url, server.headers(), plan.many, plan.instances, limit)
            many = tmp / f"post-{name}-many.lua"
            many.write_text(wrk_script(plan.many, server.headers()))
            bench_levels(name, list(MANY_LEVELS), lambda c: measure(c, many, plan.instances), report,
                         f"{plan.instances} per call, ")
    finally:
        halt(server)


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


HEADER = (f"{'profile':<20}{'c':>4}{'N':>6}{'req/s':>10}{'forecasts/s':>13}{'p50 ms':>9}{'p90 ms':>9}"
          f"{'p99 ms':>9}{'errors':>7}{'non2xx':>8}{'log B/req':>10}")


def format_row(r: dict) -> str:
    """One table line; forecasts/s only for many-per-call rows (N > 1)."""
    forecasts = f"{r['forecasts_per_s']:>13.0f}" if "forecasts_per_s" in r else " " * 13
    return (f"{r['profile']:<20}{r['concurrency']:>4}{r.get('instances', 1):>6}{r['requests_per_s']:>10.0f}"
            f"{forecasts}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>7}"
            f"{r['non_2xx']:>8}{r['log_bytes_per_request']:>10}")


def format_vs_peer(r: dict) -> str:
    return (f"{r['profile']:<20}{r['concurrency']:>4}{r['instances']:>6}{r['requests_per_s_ratio']:>10.2f}"
            f"{r['p99_ms']:>10.2f}{r['peer_p99_ms']:>13.2f}")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number >= 1: {text!r}")
    return int(text)


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/petr4"),
                        help="exported model to archive and serve")
    parser.add_argument("--handlers", type=Path, default=Path("handlers"),
                        help="handler, model-config.yaml and server configs")
    parser.add_argument("--profiles", default=",".join([*PROFILES, PEER]),
                        help=f"comma list of {', '.join(CHOICES)}, or all")
    parser.add_argument("--concurrency", type=positive, nargs="+", default=[1, 16, 64],
                        help="open connections, one wrk run each")
    parser.add_argument("--seconds", type=positive, default=10, help="length of each wrk run")
    parser.add_argument("--warmup", type=positive, default=30,
                        help="seconds of load at concurrency 16 before the first level")
    parser.add_argument("--request", type=Path, default=Path("examples/petr4_request.json"),
                        help="the JSON body sent")
    parser.add_argument("--many", type=count, default=1000,
                        help="histories per call in the many-per-call runs (0: none)")
    parser.add_argument("--out", type=Path, default=Path("logs/bench.json"),
                        help="report file, rewritten after every level")
    args = parser.parse_args(argv)
    profiles = CHOICES if args.profiles == "all" else args.profiles.split(",")
    unknown = [p for p in profiles if p not in CHOICES]
    if unknown:
        parser.error(f"unknown profile {unknown[0]!r}: choose from {', '.join(CHOICES)}, or all")
    missing = [f for f in ("model.onnx", "model.pt", "meta.json") if not (args.artifacts / f).is_file()]
    if missing:
        raise SystemExit(f"error: {args.artifacts / missing[0]} is missing: train first (make train)")
    try:
        request = json.loads(args.request.read_text())
        many = many_body(request, args.many) if args.many else ""
    except (OSError, ValueError, TypeError, KeyError) as e:  # KeyError, TypeError: no "history" list
        raise SystemExit(f"error: cannot read the request {args.request}: {type(e).__name__}: {e}") from None
    plan = Plan(args.concurrency, args.seconds, json.dumps(request), args.many, many, args.warmup)
    if shutil.which("wrk") is None:
        raise SystemExit("error: the load generator wrk is missing: apt-get install wrk")

    forward = time_forward(args.artifacts)
    report = Report(args.out, machine={"cpus": os.cpu_count(), "python": platform.python_version()},
                    seconds_per_level=args.seconds, forward=forward)
    report.write()
    print("model forward alone, 1 thread (us per forecast)")
    for r in forward:
        print(f"  {r['format']:<12} batch {r['batch']:>3}: {r['us_per_forecast']:>8.1f}")
    print(f"\n{HEADER}")
    with tempfile.TemporaryDirectory(prefix="stockcast-bench-") as tmp:
        failed = run_profiles(profiles, lambda name: bench_profile(
            name, args.artifacts, args.handlers, plan, Path(tmp), report), report)
    for key, value in ratios(report.data["http"]).items():
        print(f"requests/s, {key.replace('_over_', ' / ')}: {value}")
    if report.data["vs_peer"]:
        print(f"\nagainst the peer{'c':>8}{'N':>6}{'req/s x':>10}{'p99 ms':>10}{'peer p99 ms':>13}")
        print("\n".join(format_vs_peer(r) for r in report.data["vs_peer"]))
    print(f"written to {args.out}")
    if failed:
        print(f"bench: FAILED: {', '.join(failed)} (reasons above and in {args.out})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
