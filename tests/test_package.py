"""lstm.mar is rebuilt exactly when its content would change, from one version of the artifacts,
and concurrent builds never mix."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
from conftest import ROOT

from stockcast.package import PROFILES, build_archive, contents


def test_archive_is_rebuilt_only_when_an_input_changes(artifacts, tmp_path):
    own = tmp_path / "artifacts"
    shutil.copytree(artifacts, own)
    mar = build_archive(own, tmp_path / "store", handlers=ROOT / "handlers")
    built = mar.stat().st_mtime_ns
    assert build_archive(own, tmp_path / "store", handlers=ROOT / "handlers") == mar
    assert mar.stat().st_mtime_ns == built  # nothing changed: not rebuilt
    (own / "meta.json").write_text((own / "meta.json").read_text().replace('"petr4"', '"other"'))
    build_archive(own, tmp_path / "store", handlers=ROOT / "handlers")
    with zipfile.ZipFile(mar) as z:
        assert b'"other"' in z.read("meta.json")


def test_missing_artifacts_say_train_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        build_archive(tmp_path, tmp_path / "store", handlers=ROOT / "handlers")


def test_artifacts_read_during_a_publish_are_refused_not_mixed(artifacts, tmp_path):
    own = tmp_path / "artifacts"
    shutil.copytree(artifacts, own)
    (own / "scaler.json").write_text((own / "scaler.json").read_text() + " ")  # another version
    with pytest.raises(ValueError, match=r"scaler.json does not match the sha256 in meta.json"):
        build_archive(own, tmp_path / "store", handlers=ROOT / "handlers")
    assert not (tmp_path / "store" / "lstm.mar").exists()


def test_a_build_while_training_publishes_reads_one_version(artifacts, tmp_path):
    from stockcast.export import publish

    versions = [tmp_path / "v0", tmp_path / "v1"]
    for v in versions:
        shutil.copytree(artifacts, v)
    scaler = json.loads((versions[1] / "scaler.json").read_text())
    scaler["mean"][0] += 0.01  # a second training run: another scaler, its sha256 in its meta.json
    (versions[1] / "scaler.json").write_text(json.dumps(scaler))
    meta = json.loads((versions[1] / "meta.json").read_text())
    meta["sha256"]["scaler.json"] = hashlib.sha256((versions[1] / "scaler.json").read_bytes()).hexdigest()
    (versions[1] / "meta.json").write_text(json.dumps(meta))
    target = tmp_path / "artifacts" / "petr4"
    shutil.copytree(versions[0], target)
    done = threading.Event()

    def keep_publishing() -> None:  # the way train.py publishes: a whole folder swapped in
        i = 0
        while not done.is_set():
            shutil.copytree(versions[i % 2], tmp_path / f"staging{i}")
            publish(tmp_path / f"staging{i}", target)
            i += 1

    thread = threading.Thread(target=keep_publishing)
    thread.start()
    consistent = 0
    try:
        for _ in range(300):
            try:
                entries = contents(target, ROOT / "handlers", "onnx", {})
            except (ValueError, FileNotFoundError):  # refused in one line: fine, never mixed
                continue
            recorded = json.loads(entries["meta.json"])["sha256"]
            assert hashlib.sha256(entries["scaler.json"]).hexdigest() == recorded["scaler.json"]
            consistent += 1
    finally:
        done.set()
        thread.join()
    assert consistent > 0


def archived(mar) -> dict[str, bytes]:
    with zipfile.ZipFile(mar) as z:
        assert z.testzip() is None  # every entry's CRC checks out
        return {n: z.read(n) for n in z.namelist() if not n.startswith("MAR-INF/")}


@pytest.mark.slow
def test_concurrent_builds_each_leave_exactly_one_builds_archive(artifacts, tmp_path):
    """torch-model-archiver stages in one folder per model name under /tmp: builds must not share it."""
    other = tmp_path / "other"
    shutil.copytree(artifacts, other)
    (other / "meta.json").write_text((other / "meta.json").read_text().replace('"petr4"', '"other"'))
    jobs = [(artifacts, "throughput"), (other, "latency"), (artifacts, "latency"), (other, "throughput")]
    expected = [contents(a, ROOT / "handlers", "onnx", PROFILES[p]) for a, p in jobs]
    assert len({tuple(sorted(e.items())) for e in expected}) == 4  # four different archives
    # each build into its own store, and all of them into one shared store, all at the same time
    stores = [tmp_path / f"own{i}" for i in range(4)] + [tmp_path / "shared"] * 4
    procs = [subprocess.Popen([sys.executable, "-m", "stockcast.package", str(a), str(store),
                               "--profile", p], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for store, (a, p) in zip(stores, jobs * 2, strict=True)]
    outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, outputs
    for i, entries in enumerate(expected):
        assert archived(tmp_path / f"own{i}" / "lstm.mar") == entries
    assert archived(tmp_path / "shared" / "lstm.mar") in expected
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["lstm.mar"]  # no build left behind


def test_an_export_from_before_the_registry_is_not_archived(artifacts, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(artifacts, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["version"]  # what train.py wrote before versions and the gate
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not a registered version"):
        build_archive(old, tmp_path / "store", handlers=ROOT / "handlers")
    assert not (tmp_path / "store" / "lstm.mar").exists()


def test_all_archives_every_other_registered_experiment_under_its_name_with_one_worker(artifacts, tmp_path):
    import yaml

    root = tmp_path / "artifacts"
    for name in ("petr4", "vale3", "itub4"):
        shutil.copytree(artifacts, root / name)
    unregistered = json.loads((root / "itub4" / "meta.json").read_text())
    del unregistered["version"]  # exported before the registry: never passed the gate
    (root / "itub4" / "meta.json").write_text(json.dumps(unregistered))
    (root / "backtest").mkdir()  # backtest results live beside the experiments
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "stockcast.package", str(root / "petr4"), str(store),
                           "--all"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in store.glob("*.mar")) == ["lstm.mar", "vale3.mar"]
    assert "served at /predictions/vale3" in done.stdout
    with zipfile.ZipFile(store / "vale3.mar") as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"] == "vale3"
        config = yaml.safe_load(z.read("model-config.yaml"))
    with zipfile.ZipFile(store / "lstm.mar") as z:
        default = yaml.safe_load(z.read("model-config.yaml"))
    assert (config["minWorkers"], config["maxWorkers"]) == (1, 1)
    assert default["minWorkers"] == 2 and config["handler"] == default["handler"]
    # vale3 becomes the default: its own vale3.mar goes (else VALE3 is served twice, one copy stale)
    done = subprocess.run([sys.executable, "-m", "stockcast.package", str(root / "vale3"), str(store),
                           "--all"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in store.glob("*.mar")) == ["lstm.mar", "petr4.mar"]
    assert f"{store}/vale3.mar: removed" in done.stdout


def test_another_version_of_the_same_files_is_rebuilt(artifacts, tmp_path):
    def version(mar):
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]

    mar = build_archive(artifacts, tmp_path, handlers=ROOT / "handlers")
    assert version(build_archive(artifacts, tmp_path, handlers=ROOT / "handlers", version="77")) == "77"
    assert version(mar) == "77"
    assert version(build_archive(artifacts, tmp_path, handlers=ROOT / "handlers")) != "77"
