"""Check an archive before it is served: its checksums, then a real load and one forecast.

`serve start` runs this on a new lstm.mar before it stops the server that runs, so an archive that
cannot serve never replaces one that does. The load is TorchServe's own loader, in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from stockcast.package import MODEL_NAME, mismatches


def archived_meta(model_store: Path) -> dict:
    """meta.json inside lstm.mar, after checking the files meta.json has a sha256 for."""
    mar = Path(model_store) / f"{MODEL_NAME}.mar"
    try:
        with zipfile.ZipFile(mar) as z:
            entries = {name: z.read(name) for name in z.namelist()}
        meta = json.loads(entries["meta.json"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise RuntimeError(f"{mar} is not a readable archive with a meta.json ({err})") from None
    bad = mismatches(entries)
    if bad:
        raise RuntimeError(f"{mar}: {', '.join(bad)} does not match the sha256 in its meta.json")
    return meta


def example_request(meta: dict) -> dict:
    """{"history": the last `window` closes of the served ticker's data} up to the end of its
    training data, from the file meta.json names or data/<TICKER>.csv."""
    from stockcast.prices import DataError, load_prices

    window, data = int(meta["window"]), meta.get("data", {})
    root = Path(__file__).resolve().parents[2]  # the checkout, for relative paths from elsewhere
    names = [n for n in (data.get("file"), f"data/{meta.get('ticker')}.csv") if n]
    for csv in [p for n in names for p in (Path(n), root / n)]:
        if csv.is_file():
            try:
                frame = load_prices(csv, on_suspicious="ignore")  # training warned, if anything
                closes = frame["close"][: data.get("end")].tail(window)
            except (DataError, KeyError, ValueError):
                continue
            if len(closes) == window:
                return {"history": [round(float(c), 6) for c in closes]}
    return {"history": [100.0] * window}  # no data here: flat closes still make a valid request


def probe(model_dir: str, metrics_config: str, request_file: str) -> None:
    """Load the archive extracted in `model_dir` the way a TorchServe worker does and forecast
    `request_file`; exit 1 with the cause in one line if either fails (run in a subprocess)."""
    import logging

    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader
    from ts.service import Service

    logging.disable(logging.CRITICAL)
    os.chdir(model_dir)
    sys.path.insert(0, model_dir)  # where the worker finds the handler module
    manifest = json.loads(Path("MAR-INF/MANIFEST.json").read_text())
    metrics = MetricsCacheYamlImpl(config_file_path=metrics_config)
    metrics.initialize_cache()
    request = {"requestId": b"probe", "headers": [{"name": b"Content-Type", "value": b"application/json"}],
               "parameters": [{"name": "body", "contentType": "application/json",
                               "value": Path(request_file).read_bytes()}]}
    try:
        service = TsModelLoader().load(MODEL_NAME, model_dir, manifest["model"]["handler"], None, 1,
                                       None, True, metrics)
        headers, batch, ids = Service.retrieve_data_for_inference([request])
        context = service.context
        context.request_ids, context.request_processor, metrics.request_ids = ids, headers, ids
        answer = service._entry_point(batch, context)
        status = context.get_response_status(0)[0]
    except Exception as err:  # noqa: BLE001 (any failure is the answer)
        sys.exit(f"{type(err).__name__}: {err}".splitlines()[0])
    if status != 200 or not isinstance(answer, list) or len(answer) != 1:
        sys.exit(f"the example request got {status}: {str(answer)[:200]}")


def check_archive(model_store: Path, handlers: Path, name: str | None = None) -> None:
    """RuntimeError unless `model_store`/lstm.mar opens, matches its sha256s and forecasts its
    ticker's example request (about 3 s: a worker's imports). `name`: the archive in messages."""
    name = name or f"{model_store}/{MODEL_NAME}.mar"
    try:
        meta = archived_meta(model_store)
    except RuntimeError as err:
        raise RuntimeError(str(err).replace(str(Path(model_store) / f"{MODEL_NAME}.mar"), name)) from None
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(Path(model_store) / f"{MODEL_NAME}.mar") as z:
            z.extractall(Path(tmp) / "model")
        (Path(tmp) / "request.json").write_text(json.dumps(example_request(meta)))
        code = "import sys; from stockcast.verify import probe; probe(*sys.argv[1:])"
        metrics = Path(handlers).resolve() / "metrics.yaml"
        done = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "model"), str(metrics),
                               str(Path(tmp) / "request.json")], capture_output=True, text=True,
                              timeout=120)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"{name} cannot serve: {lines[-1]}")
