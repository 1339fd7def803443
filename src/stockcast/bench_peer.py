"""The peer make bench measures TorchServe against: python -m stockcast.bench_peer artifacts/petr4 --port 8090

FastAPI on uvicorn (2 worker processes, uvloop, httptools, no access log, 127.0.0.1) with ONNX Runtime
at 1 intra/inter-op thread, serving the same exported folder (model.onnx, scaler.json, meta.json)
through the same transforms (stockcast.features): POST /predictions/lstm {"history": [closes]} or
{"instances": [{"history": [...]}, ...]}, answered as our handler does. It validates less than our
handler, which favours the peer: a missing, short or non-numeric history is a JSON 400 (one bad
instance fails its whole request); prices, moves, sizes and NaN go unchecked, nothing is counted.
"""
# no `from __future__ import annotations`: FastAPI must resolve `request: Request` inside create_app

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from stockcast import exported
from stockcast.package import MODEL_NAME
from stockcast.serve import processes

MODEL_DIR = "STOCKCAST_PEER_MODEL"  # how uvicorn's worker processes learn the folder


def create_app():
    """The FastAPI app serving the folder named by $STOCKCAST_PEER_MODEL (uvicorn's factory)."""
    from fastapi import FastAPI, Request, Response

    model = exported.load(Path(os.environ[MODEL_DIR]))
    window, horizon, pairs = model.window, int(model.meta["horizon"]), model.intervals
    info = {"name": MODEL_NAME, "ticker": model.meta["ticker"], "version": str(model.meta.get("version", ""))}
    app = FastAPI()

    def last_closes(body, where: str) -> list:
        history = body.get("history") if isinstance(body, dict) else None
        if not isinstance(history, list) or len(history) < window:
            raise ValueError(f'{where}"history" must be a list of at least {window} closes')
        return history[-window:]

    def forecast(histories: list[list]) -> list[dict]:
        # [B, T]; TypeError/ValueError if not numbers
        point, quantiles = model.forecast(np.array(histories, dtype=np.float64))
        out = [{"prediction": p[0], "forecast": p, "window": window, "horizon": horizon, "model": info}
               for p in point.tolist()]
        for answer, q in zip(out, quantiles if quantiles is not None else [], strict=False):  # [H, Q]
            answer["intervals"] = [{"level": lvl, "lower": q[:, lo].tolist(), "upper": q[:, hi].tolist()}
                                   for lvl, lo, hi in pairs]  # a point model has none
        return out

    def reply(content, code: int = 200) -> Response:
        return Response(orjson.dumps(content), code, media_type="application/json")

    @app.get("/ping")
    def ping() -> Response:
        return reply({"status": "Healthy"})

    @app.post(f"/predictions/{MODEL_NAME}")
    async def predict(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            if isinstance(body, dict) and isinstance(body.get("instances"), list) and body["instances"]:
                histories = [last_closes(x, f"instances[{i}]: ") for i, x in enumerate(body["instances"])]
                return reply({"predictions": forecast(histories)})
            return reply(forecast([last_closes(body, "")])[0])
        except (ValueError, TypeError) as e:  # orjson's JSONDecodeError is a ValueError
            return reply({"code": 400, "type": "BadRequest", "message": str(e)}, 400)

    return app


@dataclass
class Peer:
    """A running peer: its supervisor process (the leader of its own process group), URL, log."""

    proc: subprocess.Popen
    inference: str
    log: Path

    def headers(self) -> dict[str, str]:
        return {}  # no token auth


def start(model_dir: Path, home: Path, port: int, timeout: float = 60) -> Peer:
    """Start the peer in its own process group, logging to home/console.log; return once it answers."""
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "stockcast.bench_peer", str(Path(model_dir).resolve()),
               "--port", str(port)]
    with open(home / "console.log", "ab") as log:
        proc = subprocess.Popen(command, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    peer = Peer(proc, f"http://127.0.0.1:{port}", home / "console.log")
    deadline = time.monotonic() + timeout
    try:
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{peer.inference}/ping", timeout=2):
                return peer
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = peer.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"the peer did not answer on port {port}: {tail[0]} (in {peer.log})")
            time.sleep(0.2)
    except BaseException:
        stop(peer)
        raise


def stop(peer: Peer, timeout: float = 10) -> None:
    """SIGTERM the peer's process group (supervisor, workers, multiprocessing's resource tracker),
    SIGKILL whatever still runs after `timeout`; return once none of it runs. The supervisor is
    reaped last: until then its pid, the group's id, cannot go to another process."""
    group = peer.proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while processes(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    if processes(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    peer.proc.wait()


@contextlib.contextmanager
def serving(model_dir: Path, home: Path, port: int) -> Iterator[Peer]:
    """A started peer, stopped when the block ends, however it ends."""
    peer = start(model_dir, home, port)
    try:
        yield peer
    finally:
        stop(peer)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m stockcast.bench_peer",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="exported folder: model.onnx, scaler.json, meta.json")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    os.environ[MODEL_DIR] = str(args.model_dir.resolve())
    uvicorn.run("stockcast.bench_peer:create_app", factory=True, host="127.0.0.1", port=args.port,
                workers=2, loop="uvloop", http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
