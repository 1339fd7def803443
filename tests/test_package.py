"""lstm.mar is rebuilt exactly when its content would change."""

from __future__ import annotations

import shutil
import zipfile

import pytest
from conftest import ROOT

from stockcast.package import build_archive


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
