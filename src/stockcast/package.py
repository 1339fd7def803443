"""Archive exported artifacts for TorchServe: python -m stockcast.package artifacts/petr4 model_store"""

from __future__ import annotations

import argparse
import hashlib
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
    "latency": {"batchSize": 1},  # no batching wait: best for one client at a time
}


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


def up_to_date(mar: Path, entries: dict[str, bytes]) -> bool:
    """True if `mar` holds exactly these entries: by content, so switching experiments counts."""
    try:
        with zipfile.ZipFile(mar) as z:
            return all(z.read(name) == data for name, data in entries.items())
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def build_archive(artifacts: Path, export_path: Path, handlers: Path = Path("handlers"),
                  version: str | None = None, model_format: str = "onnx",
                  overrides: dict | None = None) -> Path:
    """The model (ONNX by default: fastest here), scaler.json, meta.json, the handler and its
    model-config.yaml -> export_path/lstm.mar, rebuilt only when an entry would change. The
    version TorchServe reports (and labels metrics with) is the registry's, from meta.json."""
    entries = contents(Path(artifacts), Path(handlers), model_format, overrides or {})
    version = version or json.loads(entries["meta.json"]).get("version")
    if not version:  # exported before the registry: it never passed the gate
        raise ValueError(f"{artifacts} is not a registered version (its meta.json has no \"version\"): "
                         "train again (make train), or give --version to archive it anyway")
    mar = Path(export_path) / f"{MODEL_NAME}.mar"
    if up_to_date(mar, entries):
        return mar
    mar.parent.mkdir(parents=True, exist_ok=True)
    # everything private to this build: the archiver stages in tempfile.gettempdir()/<model name>,
    # one folder shared by every build on the machine unless TMPDIR points elsewhere
    with tempfile.TemporaryDirectory(dir=mar.parent, prefix=".build-") as tmp:
        staged, out = Path(tmp) / "entries", Path(tmp) / "out"
        staged.mkdir()
        out.mkdir()
        for name, data in entries.items():  # the archiver takes files: stage exactly the entries
            (staged / name).write_bytes(data)
        extra = ",".join(str(staged / n) for n in ("scaler.json", "meta.json", ARCHIVED_AS))
        done = subprocess.run([
            archiver(), "--model-name", MODEL_NAME, "--version", version,
            "--serialized-file", str(staged / FORMATS[model_format]),
            "--handler", str(staged / "forecast_handler.py"), "--extra-files", extra,
            "--config-file", str(staged / "model-config.yaml"), "--export-path", str(out),
        ], capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        built = out / mar.name
        if done.returncode or not up_to_date(built, entries):
            raise RuntimeError(f"torch-model-archiver failed: {done.stderr or done.stdout}")
        os.replace(built, mar)  # readers see the old archive or the new one, never a mix
    return mar


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
    args = parser.parse_args()
    mar = args.export_path / f"{MODEL_NAME}.mar"
    try:
        overrides = PROFILES[args.profile]
        fresh = up_to_date(mar, contents(args.artifacts, Path("handlers"), args.format, overrides))
        build_archive(args.artifacts, args.export_path, version=args.version,
                      model_format=args.format, overrides=overrides)
    except (OSError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    print(f"{mar}: {'up to date with' if fresh else 'built from'} {args.artifacts} "
          f"({args.format}, {args.profile} profile)")


if __name__ == "__main__":
    main()
