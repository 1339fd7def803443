"""Start, check and stop TorchServe with the lstm archive: python -m stockcast.serve start|stop|status

Each server lives in its own folder (config, logs, pid file, token file), runs in its own process
group, and is stopped through that group: exactly what was started, nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stockcast.package import MODEL_NAME

# HTTP inference, management, metrics; then gRPC inference, management (TorchServe always opens
# both gRPC ports, on loopback: two servers on one machine need their own)
PORTS = (8080, 8081, 8082, 7070, 7071)


@dataclass
class Server:
    home: Path
    pid: int
    ports: tuple[int, ...] = PORTS
    host: str = "127.0.0.1"

    @property
    def inference(self) -> str:
        return f"http://{self.host}:{self.ports[0]}"

    @property
    def management(self) -> str:
        return f"http://{self.host}:{self.ports[1]}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.ports[2]}/metrics"

    def token(self, api: str = "inference") -> str | None:
        """The current key of `api` (inference | management) if token auth is on, else None."""
        try:
            return json.loads((self.home / "key_file.json").read_text())[api]["key"]
        except (OSError, ValueError):  # no token auth, or TorchServe is still writing the file
            return None

    def headers(self, api: str = "inference") -> dict[str, str]:
        token = self.token(api)
        return {"Authorization": f"Bearer {token}"} if token else {}


def free_ports(n: int = len(PORTS)) -> tuple[int, ...]:
    """`n` TCP ports free on loopback right now, for servers that must not collide."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in sockets)
    for s in sockets:
        s.close()
    return ports


def archive_digest(model_store: Path) -> str:
    return hashlib.sha256((Path(model_store) / f"{MODEL_NAME}.mar").read_bytes()).hexdigest()


def render_config(base: Path, overrides: dict[str, str]) -> str:
    """`base` config.properties with `overrides` replacing (or adding) keys."""
    lines, seen = [], set()
    for line in Path(base).read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in overrides:
            line, _ = f"{key}={overrides[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(lines) + "\n"


def processes(pgid: int) -> dict[int, bytes]:
    """pid -> command line of every live process in process group `pgid`."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp
            if int(fields[2]) == pgid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 2) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def ready(server: Server) -> bool:
    """True once a worker of the model is READY (the /ping answer comes before the model loads)."""
    try:
        code, body = get(f"{server.management}/models/{MODEL_NAME}", server.headers("management"))
    except OSError:
        return False
    return code == 200 and any(w.get("status") == "READY" for w in json.loads(body)[0]["workers"])


def start(model_store: Path, home: Path, handlers: Path = Path("handlers"), ports=PORTS,
          token_auth: bool = False, quiet_logs: bool = True, timeout: float = 120) -> Server:
    """Start TorchServe in the background with `model_store`/lstm.mar; return once it can predict."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise RuntimeError("TorchServe needs Java 17: apt-get install openjdk-17-jre-headless "
                           "(or brew install openjdk@17), then try again")
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"port {port} on 127.0.0.1 is in use: stop what listens there "
                                   "(make stop, if it is an earlier server) and try again")
    home, handlers = Path(home).resolve(), Path(handlers).resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "key_file.json").unlink(missing_ok=True)  # a stale key would print a wrong curl
    settings = {
        "inference_address": f"http://127.0.0.1:{ports[0]}",
        "management_address": f"http://127.0.0.1:{ports[1]}",
        "metrics_address": f"http://127.0.0.1:{ports[2]}",
        "grpc_inference_port": str(ports[3]),
        "grpc_management_port": str(ports[4]),
        "model_store": str(Path(model_store).resolve()),
        "metrics_config": str(handlers / "metrics.yaml"),
        "disable_token_authorization": str(not token_auth).lower(),
    }
    config = home / "config.properties"
    config.write_text(render_config(handlers / "config.properties", settings))
    # TMPDIR (pid file), TEMP (worker sockets) and LOG_LOCATION keep each server to its `home`
    # (threads per worker come from model-config.yaml's handler.threads, not from OMP_NUM_THREADS)
    env = {**os.environ, "TMPDIR": str(home), "TEMP": str(home), "LOG_LOCATION": str(home / "logs"),
           "METRICS_LOCATION": str(home / "logs")}
    launcher = Path(sys.executable).parent / "torchserve"
    command = [str(launcher if launcher.exists() else "torchserve"), "--foreground", "--ncs",
               "--ts-config", str(config), "--model-store", settings["model_store"]]
    if quiet_logs:  # production log levels; without it, TorchServe's own (~4 KB per request)
        command += ["--log-config", str(handlers / "log4j2.xml")]
    with open(home / "logs" / "console.log", "ab") as console:
        proc = subprocess.Popen(
            command,
            cwd=home, env=env, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends Java and workers together
        )
    server = Server(home, proc.pid, tuple(ports))
    # what `running` reads back: the process group to stop, the ports, the archive it loads
    (home / "server.json").write_text(json.dumps({
        "pid": proc.pid, "ports": list(ports),
        "archive_sha256": archive_digest(model_store)}))
    deadline = time.monotonic() + timeout
    try:
        while not ready(server):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (home / "logs" / "console.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError("TorchServe did not become ready:\n" + "\n".join(tail))
            time.sleep(0.25)
    except BaseException:  # never leave a half-started server behind
        stop(server)
        raise
    return server


def stop(server: Server, timeout: float = 30) -> None:
    """Stop the server's process group (launcher, Java frontend, Python workers) and wait for it."""
    if not alive(server.pid):
        return
    os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            os.waitpid(server.pid, os.WNOHANG)  # reap it when it is our own child
        except ChildProcessError:
            pass
    if alive(server.pid):
        os.killpg(server.pid, signal.SIGKILL)
    # TorchServe deletes its keys only when stopped through its own CLI
    (server.home / "key_file.json").unlink(missing_ok=True)


def running(home: Path) -> tuple[Server, str] | tuple[None, None]:
    """The server recorded in `home` and the sha256 of the archive it loaded, if it is alive."""
    try:
        record = json.loads((Path(home) / "server.json").read_text())
    except (OSError, ValueError):
        return None, None
    server = Server(Path(home).resolve(), int(record["pid"]), tuple(record["ports"]))
    return (server, record["archive_sha256"]) if alive(server.pid) else (None, None)


def example_curl(server: Server, request_file: str = "examples/petr4_request.json") -> str:
    token = server.token()
    auth = f" -H 'Authorization: Bearer {token}'" if token else ""
    return (f"curl -X POST {server.inference}/predictions/{MODEL_NAME} "
            f"-H 'Content-Type: application/json'{auth} -d @{request_file}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.serve",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=Path("logs/serve"),
                        help="the server's folder: config, logs, pid file, token keys")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"),
                        help=f"folder holding {MODEL_NAME}.mar")
    parser.add_argument("--token-auth", action="store_true",
                        help="require TorchServe's keys (written to HOME/key_file.json)")
    parser.add_argument("--ports", type=int, nargs=5, default=list(PORTS),
                        metavar=("INFERENCE", "MANAGEMENT", "METRICS", "GRPC", "GRPC_MANAGEMENT"),
                        help="ports on 127.0.0.1")
    args = parser.parse_args()
    server, loaded = running(args.home)
    if args.command == "stop":
        if server:
            stop(server)
        print(f"stopped TorchServe (pid {server.pid})" if server else "TorchServe is not running")
        return
    if args.command == "status":
        if not server:
            sys.exit("TorchServe is not running")
        print(f"TorchServe is serving (pid {server.pid}), ready: {ready(server)}")
        print(example_curl(server))
        return
    try:
        if not (args.model_store / f"{MODEL_NAME}.mar").exists():
            raise RuntimeError(f"no {args.model_store}/{MODEL_NAME}.mar: run make package first")
        if server and loaded == archive_digest(args.model_store):
            print(f"TorchServe is already serving this {MODEL_NAME}.mar (pid {server.pid})")
            print(f"forecast: {example_curl(server)}")
            return
        if server:  # a new archive (another profile, experiment or training): load it
            print(f"{MODEL_NAME}.mar changed since TorchServe started: restarting it")
            stop(server)
        server = start(args.model_store, args.home, ports=args.ports, token_auth=args.token_auth)
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    print(f"TorchServe is serving {MODEL_NAME} (pid {server.pid}, logs in {server.home}/logs)")
    print(f"metrics: curl {server.metrics}")
    print(f"forecast: {example_curl(server)}")


if __name__ == "__main__":
    main()
