"""Soak test: a steady request rate for a long time, watching errors, p99 and memory.

python -m stockcast.soak --minutes 10 --rate 300   (make soak; starts its own server on free ports)
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stockcast.package import build_archive
from stockcast.serve import Server, free_ports, processes, start, stop


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
class Window:
    """What one sampling window saw."""

    t: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self, server: Server) -> dict:
        procs = server_processes(server)
        lat = np.array(self.latencies_ms or [np.nan])
        return {"t_s": round(self.t, 1), "requests": len(self.latencies_ms), "errors": self.errors,
                "p50_ms": round(float(np.percentile(lat, 50)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "frontend_mb": round(sum(rss_mb(p) for p in procs["frontend"]), 1),
                "workers_mb": round(sum(rss_mb(p) for p in procs["workers"]), 1)}


def run(server: Server, seconds: float, rate: float, body: bytes, every: float = 5.0,
        clients: int = 4, log=print) -> list[dict]:
    """Send `rate` requests/s for `seconds` from `clients` keep-alive connections; a summary per
    `every` seconds."""
    host, port = server.inference.removeprefix("http://").split(":")
    headers = {"Content-Type": "application/json", **server.headers()}
    start_t = time.monotonic()
    window = Window(0.0)
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
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
            with lock:
                window.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                window.errors += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    summaries = []
    while any(t.is_alive() for t in threads):
        time.sleep(min(every, max(0.1, start_t + seconds - time.monotonic())))
        with lock:
            done, window = window, Window(time.monotonic() - start_t)
        if len(done.latencies_ms) >= rate:  # not the stragglers after the last full window
            summaries.append(done.summary(server))
            log(json.dumps(summaries[-1]))
    return summaries


def verdict(summaries: list[dict], tolerance: float = 0.10) -> dict:
    """Errors, and memory and p99 at the start (after the first, warm-up window) and the end."""
    first, last = summaries[1] if len(summaries) > 2 else summaries[0], summaries[-1]
    drift = {k: (last[k] - first[k]) / first[k] for k in ("frontend_mb", "workers_mb")}
    return {"requests": sum(s["requests"] for s in summaries),
            "errors": sum(s["errors"] for s in summaries),
            "start": first, "end": last, "memory_drift": {k: round(v, 3) for k, v in drift.items()},
            "memory_flat": all(abs(v) <= tolerance for v in drift.values())}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.soak", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long to send")
    parser.add_argument("--rate", type=float, default=300, help="requests per second")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/petr4"),
                        help="exported model to archive and serve")
    parser.add_argument("--request", type=Path, default=Path("examples/petr4_request.json"),
                        help="the JSON body sent")
    parser.add_argument("--out", type=Path, default=Path("logs/soak.json"), help="report file")
    args = parser.parse_args()
    body = json.dumps(json.loads(args.request.read_text())).encode()
    with tempfile.TemporaryDirectory(prefix="stockcast-soak-") as tmp:
        store = build_archive(args.artifacts, Path(tmp) / "store").parent
        server = start(store, Path(tmp) / "server", ports=free_ports())
        try:
            summaries = run(server, args.minutes * 60, args.rate, body, every=30)
        finally:
            stop(server)
    result = verdict(summaries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"windows": summaries, **result}, indent=2))
    print(json.dumps(result, indent=2))
    if result["errors"] or not result["memory_flat"]:
        raise SystemExit("soak: FAILED (errors, or memory drifted more than 10%)")


if __name__ == "__main__":
    main()
