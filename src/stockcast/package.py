"""Archive exported artifacts for TorchServe: python -m stockcast.package artifacts/petr4 model_store"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

MODEL_NAME = "lstm"


def archiver() -> str:
    """torch-model-archiver from this environment, else from PATH."""
    local = Path(sys.executable).parent / "torch-model-archiver"
    return str(local) if local.exists() else shutil.which("torch-model-archiver") or "torch-model-archiver"


def inputs(artifacts: Path, handlers: Path) -> dict[str, Path]:
    """Archive entry name -> the file it is made from."""
    return {"model.pt": artifacts / "model.pt", "scaler.json": artifacts / "scaler.json",
            "meta.json": artifacts / "meta.json", "forecast_handler.py": handlers / "forecast_handler.py",
            "model-config.yaml": handlers / "model-config.yaml"}


def up_to_date(mar: Path, sources: dict[str, Path]) -> bool:
    """True if `mar` holds exactly these files: compared by content, so switching experiments counts."""
    try:
        with zipfile.ZipFile(mar) as z:
            return all(z.read(name) == path.read_bytes() for name, path in sources.items())
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def build_archive(artifacts: Path, export_path: Path, handlers: Path = Path("handlers"),
                  version: str = "1.0") -> Path:
    """model.pt + scaler.json + meta.json + the handler and its model-config.yaml -> lstm.mar."""
    artifacts, handlers = Path(artifacts), Path(handlers)
    sources = inputs(artifacts, handlers)
    missing = [str(p) for p in sources.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}; train first (make train)")
    mar = Path(export_path) / f"{MODEL_NAME}.mar"
    if up_to_date(mar, sources):
        return mar
    Path(export_path).mkdir(parents=True, exist_ok=True)
    subprocess.run([
        archiver(), "--model-name", MODEL_NAME, "--version", version,
        "--serialized-file", str(artifacts / "model.pt"),
        "--handler", str(handlers / "forecast_handler.py"),
        "--extra-files", f"{artifacts / 'scaler.json'},{artifacts / 'meta.json'}",
        "--config-file", str(handlers / "model-config.yaml"),
        "--export-path", str(export_path), "--force",
    ], check=True)
    return mar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path, nargs="?", default=Path("artifacts/petr4"))
    parser.add_argument("export_path", type=Path, nargs="?", default=Path("model_store"))
    parser.add_argument("--version", default="1.0")
    args = parser.parse_args()
    fresh = up_to_date(args.export_path / f"{MODEL_NAME}.mar", inputs(args.artifacts, Path("handlers")))
    try:
        mar = build_archive(args.artifacts, args.export_path, version=args.version)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(f"{mar}: {'up to date with' if fresh else 'built from'} {args.artifacts}")


if __name__ == "__main__":
    main()
