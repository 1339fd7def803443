"""Archive exported artifacts for TorchServe: python -m stockcast.package artifacts/petr4 model_store

The archive is model_store/lstm.mar, the default model. --all also archives every other trained
experiment beside it (artifacts/vale3 -> model_store/vale3.mar, served at /predictions/vale3), with
one worker each. --kserve DIR also writes the folder KServe's TorchServe runtime serves from a
storageUri (DIR/config/config.properties, metrics.yaml, log4j2.xml and DIR/model-store/lstm.mar).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from stockcast import features
from stockcast.features import ARCHIVED_AS

MODEL_NAME = "lstm"
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
# serving profiles: overrides of handlers/model-config.yaml (measured with make bench, see README)
PROFILES: dict[str, dict] = {
    "throughput": {},  # batches of up to 8 with a 1 ms wait: best at concurrency 16 and up
    # no batching wait: a batch is what is queued when a worker is free (at most 2: TorchServe's
    # Model.pollBatch stops at the second job when the delay is 0). 0 holds only through the
    # model_snapshot stockcast.serve writes; a load_models start reads it as 100 ms
    "latency": {"maxBatchDelay": 0},
}
# every ticker beside the default one: one worker, since each TorchServe worker imports torch
# (~155 MB of private memory: 20 tickers in ~3.5 GB with the frontend)
OTHER_TICKERS = {"minWorkers": 1, "maxWorkers": 1}


def archiver() -> str:
    """torch-model-archiver from this environment, else from PATH."""
    local = Path(sys.executable).parent / "torch-model-archiver"
    return str(local) if local.exists() else shutil.which("torch-model-archiver") or "torch-model-archiver"


def model_config(handlers: Path, overrides: dict) -> bytes:
    """handlers/model-config.yaml with `overrides` (None removes a key, dicts merge one level)."""
    text = (handlers / "model-config.yaml").read_bytes()
    if not overrides:
        return text  # as written, comments included
    config = yaml.safe_load(text)
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    return yaml.safe_dump(config, sort_keys=False).encode()


def mismatches(entries: dict[str, bytes]) -> list[str]:
    """Entries whose sha256 differs from the one meta.json records for them."""
    try:
        recorded = json.loads(entries["meta.json"])["sha256"]
    except (ValueError, KeyError, TypeError):
        return ["meta.json"]
    return [name for name, data in entries.items()
            if name in recorded and hashlib.sha256(data).hexdigest() != recorded[name]]


def contents(artifacts: Path, handlers: Path, model_format: str, overrides: dict) -> dict[str, bytes]:
    """Archive entry name -> its bytes, all from one version of `artifacts`."""
    files = {FORMATS[model_format]: artifacts / FORMATS[model_format],
             "scaler.json": artifacts / "scaler.json", "meta.json": artifacts / "meta.json",
             "forecast_handler.py": handlers / "forecast_handler.py",
             # the handler's transform between prices and the network: the one training uses
             ARCHIVED_AS: Path(features.__file__)}
    # a training run publishes by swapping the whole folder: files read across a swap come from
    # two versions, which the sha256s in meta.json reveal; a second read sees the new version whole
    missing: list[str] = []
    bad: list[str] = []
    for _ in range(2):
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:  # not trained, or between the two renames of a publish
            continue
        try:
            entries = {name: path.read_bytes() for name, path in files.items()}
        except FileNotFoundError as err:  # swapped out between the check and the read
            bad = [Path(err.filename).name]
            continue
        bad = mismatches(entries)
        if not bad:
            return {**entries, "model-config.yaml": model_config(handlers, overrides)}
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}; train first (make train)")
    raise ValueError(f"{artifacts}: {', '.join(bad)} does not match the sha256 in meta.json "
                     "(being published by a training run? try again)")


def up_to_date(mar: Path, entries: dict[str, bytes], version: str | None = None) -> bool:
    """True if `mar` holds exactly these entries (by content, so switching experiments counts) and,
    if given, reports this version."""
    try:
        with zipfile.ZipFile(mar) as z:
            same = all(z.read(name) == data for name, data in entries.items())
            return same and (version is None or
                             json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == version)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def build_archive(artifacts: Path, export_path: Path, handlers: Path = Path("handlers"),
                  version: str | None = None, model_format: str = "onnx",
                  overrides: dict | None = None, name: str = MODEL_NAME) -> Path:
    """The model (ONNX by default: fastest here), scaler.json, meta.json, the handler and its
    model-config.yaml -> export_path/`name`.mar, rebuilt only when an entry would change. The
    version TorchServe reports (and labels metrics with) is the registry's, from meta.json."""
    entries = contents(Path(artifacts), Path(handlers), model_format, overrides or {})
    version = version or json.loads(entries["meta.json"]).get("version")
    if not version:  # exported before the registry: it never passed the gate
        raise ValueError(f"{artifacts} is not a registered version (its meta.json has no \"version\"): "
                         "train again (make train), or give --version to archive it anyway")
    mar = Path(export_path) / f"{name}.mar"
    if up_to_date(mar, entries, version):
        return mar
    mar.parent.mkdir(parents=True, exist_ok=True)
    # everything private to this build: the archiver stages in tempfile.gettempdir()/<model name>,
    # one folder shared by every build on the machine unless TMPDIR points elsewhere
    with tempfile.TemporaryDirectory(dir=mar.parent, prefix=".build-") as tmp:
        staged, out = Path(tmp) / "entries", Path(tmp) / "out"
        staged.mkdir()
        out.mkdir()
        for entry, data in entries.items():  # the archiver takes files: stage exactly the entries
            (staged / entry).write_bytes(data)
        extra = ",".join(str(staged / n) for n in ("scaler.json", "meta.json", ARCHIVED_AS))
        done = subprocess.run([
            archiver(), "--model-name", name, "--version", version,
            "--serialized-file", str(staged / FORMATS[model_format]),
            "--handler", str(staged / "forecast_handler.py"), "--extra-files", extra,
            "--config-file", str(staged / "model-config.yaml"), "--export-path", str(out),
        ], capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        built = out / mar.name
        if done.returncode or not up_to_date(built, entries, version):
            raise RuntimeError(f"torch-model-archiver failed: {done.stderr or done.stdout}")
        os.replace(built, mar)  # readers see the old archive or the new one, never a mix
    return mar


# KServe: the storage initializer puts storageUri's content here, and KServe's TorchServe wrapper
# (pytorch/serve kubernetes/kserve/kserve_wrapper) takes 8080 (HTTP) and 8081 (gRPC) itself and
# forwards to TorchServe at the inference_address it reads from config.properties: 8085 by convention
KSERVE_ROOT = "/mnt/models"
KSERVE_ADDRESS = "http://127.0.0.1:8085"
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")


def properties(path: Path) -> dict[str, str]:
    """key=value lines of a TorchServe config (no continuation lines: ours have none)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def kserve_config(handlers: Path, overrides: dict, version: str) -> str:
    """config.properties for KServe's TorchServe runtime: the Docker config's serving settings,
    KServe's paths and ports, and the archive's batching in model_snapshot."""
    docker = properties(handlers / "config.docker.properties")
    model = yaml.safe_load(model_config(handlers, overrides))
    # one request per batch: TorchServe 0.12's v1 envelope reads only a batch's first request and
    # answers once, so a batch of several requests fails them all (503); the instances of one
    # request are still forecast in one forward pass
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {MODEL_NAME: {version: {
        "defaultVersion": True, "marName": f"{MODEL_NAME}.mar", **{k: model[k] for k in SNAPSHOT_KEYS},
        "batchSize": 1, "maxBatchDelay": 0}}}}
    kept = ("max_request_size", "max_response_size", "default_response_timeout",
            "install_py_dep_per_model", "enable_model_api")
    lines = [
        "# KServe's TorchServe runtime reads this from storageUri as /mnt/models/config/config.properties.",
        "# Written by python -m stockcast.package --kserve from handlers/config.docker.properties and",
        "# model-config.yaml: change those and package again, not this file.",
        "# The wrapper serves KServe's API on 8080 (gRPC 8081) and forwards to TorchServe here, inside",
        "# the pod only; it reads inference_address, management_address, model_store and model_snapshot.",
        f"inference_address={KSERVE_ADDRESS}",
        f"management_address={KSERVE_ADDRESS}",
        "# scraped from outside the pod: the runtime annotates prometheus.kserve.io/port 8082",
        f"metrics_address={docker['metrics_address']}",
        "grpc_inference_port=7070",
        "grpc_management_port=7071",
        "metrics_mode=prometheus",
        f"metrics_config={KSERVE_ROOT}/config/metrics.yaml",
        f"model_store={KSERVE_ROOT}/model-store",
        "load_models=all",
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}",
        f"allowed_urls=file://{KSERVE_ROOT}/model-store/[^/]+\\\\.mar",
        "# The wrapper sends no Authorization header (neither for predictions nor for its readiness",
        "# check of the workers), and TorchServe 0.12 cannot be given a key: token auth must be off.",
        "# Inference and management listen on loopback only; authenticate at KServe's ingress.",
        "disable_token_authorization=true",
        "# service_envelope comes from TS_SERVICE_ENVELOPE, which the runtime sets from the protocol",
        "# (kserve for v1, kservev2 for v2): TorchServe reads TS_* variables only with this on",
        "enable_envvars_config=true",
        *(f"{key}={docker[key]}" for key in kept),
        "# the runtime starts torchserve without --log-config: production log levels through the JVM",
        f"vmargs={docker['vmargs']} -Dlog4j.configurationFile=file://{KSERVE_ROOT}/config/log4j2.xml",
    ]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, data: bytes) -> None:
    """Readers and concurrent writers see the old file or a whole new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the files from the server's user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def kserve_folder(mar: Path, folder: Path, handlers: Path = Path("handlers"),
                  overrides: dict | None = None) -> Path:
    """`folder` as KServe's TorchServe runtime wants its storageUri: config/config.properties
    (+ metrics.yaml, log4j2.xml) and model-store/lstm.mar, a copy of `mar`."""
    archive = Path(mar).read_bytes()  # once: a build may replace lstm.mar meanwhile
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        version = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]
    write_atomically(folder / "config" / "config.properties",
                     kserve_config(Path(handlers), overrides or {}, version).encode())
    for name in ("metrics.yaml", "log4j2.xml"):
        write_atomically(folder / "config" / name, (Path(handlers) / name).read_bytes())
    write_atomically(folder / "model-store" / Path(mar).name, archive)
    return folder


def trained(root: Path) -> list[Path]:
    """The experiments under `root` that hold a registered version (artifacts/<name>/meta.json)."""
    found = []
    for meta in sorted(Path(root).glob("*/meta.json")):
        try:
            if json.loads(meta.read_text()).get("version"):
                found.append(meta.parent)
        except (OSError, ValueError):
            continue
    return found


def build_others(artifacts: Path, export_path: Path, overrides: dict, model_format: str = "onnx",
                 handlers: Path = Path("handlers")) -> list[Path]:
    """Every trained experiment beside `artifacts` -> export_path/<name>.mar, one worker each; the
    default experiment's own <name>.mar, left from when another was the default, is removed (it is
    served as lstm now: a second copy would serve it twice, and never be updated)."""
    own = Path(export_path) / f"{Path(artifacts).resolve().name}.mar"
    if own.is_file() and own.name != f"{MODEL_NAME}.mar":
        own.unlink()
        print(f"{own}: removed ({own.stem} is the default model now, served as {MODEL_NAME})")
    others = [a for a in trained(Path(artifacts).parent) if a.resolve() != Path(artifacts).resolve()]
    return [build_archive(a, export_path, handlers=handlers, model_format=model_format,
                          overrides={**overrides, **OTHER_TICKERS}, name=a.name) for a in others]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.package", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="?", default=Path("artifacts/petr4"),
                        help="a training run's exported folder")
    parser.add_argument("export_path", type=Path, nargs="?", default=Path("model_store"),
                        help="where lstm.mar is written")
    parser.add_argument("--version", help="model version TorchServe reports (default: the registry "
                        "version in meta.json)")
    parser.add_argument("--format", choices=list(FORMATS), default="onnx",
                        help="which exported model to serve")
    parser.add_argument("--profile", choices=list(PROFILES), default="throughput",
                        help="serving profile: overrides of handlers/model-config.yaml")
    parser.add_argument("--all", action="store_true",
                        help="also archive every other trained experiment beside ARTIFACTS as "
                        "EXPORT_PATH/<name>.mar (served at /predictions/<name>)")
    parser.add_argument("--kserve", type=Path, metavar="DIR",
                        help="also write DIR/config/config.properties and DIR/model-store/lstm.mar "
                        "for KServe's TorchServe runtime (deploy/kserve/)")
    args = parser.parse_args()
    mar = args.export_path / f"{MODEL_NAME}.mar"
    try:
        overrides = PROFILES[args.profile]
        entries = contents(args.artifacts, Path("handlers"), args.format, overrides)
        fresh = up_to_date(mar, entries, args.version)
        build_archive(args.artifacts, args.export_path, version=args.version,
                      model_format=args.format, overrides=overrides)
        others = build_others(args.artifacts, args.export_path, overrides, args.format) if args.all else []
        if args.kserve:
            kserve_folder(mar, args.kserve, overrides=overrides)
    except (OSError, ValueError, RuntimeError, KeyError, zipfile.BadZipFile) as err:
        sys.exit(f"error: {err}")
    print(f"{mar}: {'up to date with' if fresh else 'built from'} {args.artifacts} "
          f"({args.format}, {args.profile} profile)")
    for other in others:
        print(f"{other}: from {args.artifacts.parent / other.stem} (served at /predictions/{other.stem})")
    if args.kserve:
        print(f"{args.kserve}: config/config.properties and model-store/{mar.name} for KServe")


if __name__ == "__main__":
    main()
