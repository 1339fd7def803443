"""Soak test: a steady request rate for a long time, watching errors, p99 and memory.

python -m stockcast.soak --minutes 10 --rate 300   (make soak; starts its own server on free ports)

Errors, latencies and the resident memory of the frontend and the workers are sampled every
`--every` seconds. The first sample is the warm-up; memory is judged flat or not from the samples
after it, and with fewer than MIN_SAMPLES of them there is no verdict (exit 1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stockcast.package import build_archive
from stockcast.serve import Server, free_ports, processes, start, stop

MIN_SAMPLES = 4  # after the warm-up one: fewer cannot tell a trend from noise


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def server_processes(server: Server) -> dict[str, list[int]]:
    """The Java frontend's pid and the Python workers' pids of `server`."""
    members = processes(server.pid)
    return {"frontend": [p for p, cmd in members.items() if b"org.pytorch.serve.ModelServer" in cmd],
            "workers": [p for p, cmd in members.items() if b"model_service_worker" in cmd]}


@dataclass
class Sample:
    """What the clients saw in one sampling period, starting `t` seconds into the soak."""

    t: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self, server: Server) -> dict:
        """This period's requests, errors and latencies, and the server's memory now."""
        procs = server_processes(server)
        lat = np.array(self.latencies_ms)
        p50, p99 = (round(float(np.percentile(lat, q)), 2) for q in (50, 99)) if lat.size else (None, None)
        return {"t_s": round(self.t, 1), "requests": len(self.latencies_ms), "errors": self.errors,
                "p50_ms": p50, "p99_ms": p99,
                "frontend_mb": round(sum(rss_mb(p) for p in procs["frontend"]), 1),
                "workers_mb": round(sum(rss_mb(p) for p in procs["workers"]), 1)}


def run(server: Server, seconds: float, rate: float, body: bytes, every: float = 5.0,
        clients: int = 4, log=print) -> list[dict]:
    """Send `rate` requests/s for `seconds` from `clients` keep-alive connections; one summary
    (Sample.summary) per `every` seconds."""
    host, port = server.inference.removeprefix("http://").split(":")
    headers = {"Content-Type": "application/json", **server.headers()}  # the token, if any
    start_t = time.monotonic()
    sample = Sample(0.0)
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        interval = clients / rate
        next_t = start_t + k * interval / clients
        while (now := time.monotonic()) < start_t + seconds:
            if now < next_t:
                time.sleep(next_t - now)
            next_t += interval  # a fixed schedule: a slow answer does not lower the rate asked
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predictions/lstm", body, headers)
                response = conn.getresponse()
                ok = response.status == 200 and bool(json.loads(response.read())["forecast"])
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
            with lock:
                sample.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                sample.errors += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    summaries = []
    while any(t.is_alive() for t in threads):
        time.sleep(min(every, max(0.1, start_t + seconds - time.monotonic())))
        now = time.monotonic() - start_t
        with lock:
            done, sample = sample, Sample(now)
        # a whole period only: not the short one at the end, nor the stragglers' after it
        if now - done.t >= every / 2 and done.t < seconds:
            summaries.append(done.summary(server))
            log(json.dumps(summaries[-1]))
    return summaries


def verdict(summaries: list[dict], tolerance: float = 0.10, min_samples: int = MIN_SAMPLES) -> dict:
    """Errors; memory and p99 at the start (the first sample after the warm-up one) and the end.
    `memory_flat` is None, with the reason in `verdict`, when the samples cannot tell."""
    result = {"requests": sum(s["requests"] for s in summaries),
              "errors": sum(s["errors"] for s in summaries)}
    steady = summaries[1:]  # the first period warms the server up
    if len(steady) < min_samples:
        return {**result, "memory_flat": None,
                "verdict": f"not enough samples: {len(steady)} after the warm-up one, need "
                           f"{min_samples} (run longer or sample more often)"}
    first, last = steady[0], steady[-1]
    gone = [k for k in ("frontend_mb", "workers_mb") if not first[k] or not last[k]]
    if gone:
        return {**result, "start": first, "end": last, "memory_flat": None,
                "verdict": f"no {gone[0].removesuffix('_mb')} process to measure"}
    drift = {k: round((last[k] - first[k]) / first[k], 3) for k in ("frontend_mb", "workers_mb")}
    flat = all(abs(v) <= tolerance for v in drift.values())
    return {**result, "start": first, "end": last, "memory_drift": drift, "memory_flat": flat,
            "verdict": "flat" if flat else f"memory drifted more than {tolerance:.0%}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.soak", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long to send")
    parser.add_argument("--rate", type=float, default=300, help="requests per second")
    parser.add_argument("--every", type=float, default=5,
                        help=f"seconds between samples (a verdict needs {MIN_SAMPLES + 1})")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/petr4"),
                        help="exported model to archive and serve")
    parser.add_argument("--request", type=Path, default=Path("examples/petr4_request.json"),
                        help="the JSON body sent")
    parser.add_argument("--out", type=Path, default=Path("logs/soak.json"), help="report file")
    args = parser.parse_args(argv)
    if not (args.minutes > 0 and args.rate > 0 and args.every > 0):
        parser.error("--minutes, --rate and --every must be positive")
    if args.every * (MIN_SAMPLES + 1) > args.minutes * 60:
        parser.error(f"{args.minutes * 60:g} s holds fewer than {MIN_SAMPLES + 1} samples of "
                     f"{args.every:g} s: raise --minutes or lower --every")
    try:
        body = json.dumps(json.loads(args.request.read_text())).encode()
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read the request {args.request}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="stockcast-soak-") as tmp:
        try:
            store = build_archive(args.artifacts, Path(tmp) / "store").parent
            server = start(store, Path(tmp) / "server", ports=free_ports())
        except (RuntimeError, OSError, ValueError, subprocess.CalledProcessError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            cause = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"  # log tail
            raise SystemExit(f"error: {cause}") from None
        try:
            summaries = run(server, args.minutes * 60, args.rate, body, every=args.every)
        finally:
            stop(server)
    result = verdict(summaries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"every_s": args.every, "samples": summaries, **result}, indent=2))
    print(json.dumps(result, indent=2))
    if result["errors"] or not result["memory_flat"]:
        raise SystemExit(f"soak: FAILED ({result['errors']} errors; memory: {result['verdict']})")


if __name__ == "__main__":
    main()
