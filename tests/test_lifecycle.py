"""serve start/stop/status under misuse: locked, verified before signalling, never stopping a healthy
server for a bad archive, failing fast, and refusing unauthenticated changes to serving state."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import ORIGINAL, post, url

from stockcast.package import OTHER_TICKERS, build_archive
from stockcast.prices import load_prices
from stockcast.serve import busy, free_ports, get, start, stop


def serve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stockcast.serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def request(method: str, address: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(address, method=method,
                                                           headers=headers or {}), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def workers(server, settle: float = 30) -> list[str]:
    """Worker states once none is still starting ("UNLOADING" is TorchServe's word for not
    running yet: start() returns when the first worker is READY), or after `settle` seconds."""
    deadline = time.monotonic() + settle
    while True:
        code, body = get(f"{server.management}/models/lstm", server.headers("management"))
        assert code == 200, body
        states = [w["status"] for w in json.loads(body)[0]["workers"]]
        if "UNLOADING" not in states or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def healthcheck(server) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK (and Kubernetes probe) script, pointed at `server`."""
    script = ROOT / "deploy" / "image" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script), "--url", server.management,
                           "--key-file", str(server.home / "key_file.json")],
                          capture_output=True, text=True, timeout=30)


def broken_archive(mar: Path, store: Path) -> Path:
    """`mar` with a model.onnx that is not a model, and meta.json's sha256 updated to match it:
    every checksum passes, and no worker can load it."""
    store.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(store / "lstm.mar", "w") as dst:
        meta = json.loads(src.read("meta.json"))
        meta["sha256"]["model.onnx"] = hashlib.sha256(b"not a model").hexdigest()
        for item in src.infolist():
            data = {"model.onnx": b"not a model", "meta.json": json.dumps(meta).encode()}.get(
                item.filename, src.read(item))
            dst.writestr(item, data)
    return store


def as_ticker(artifacts: Path, folder: Path, ticker: str, version: str | None = None) -> Path:
    """A copy of `artifacts` whose meta.json says it serves `ticker` (the petr4 model with that
    ticker's data file), as training that ticker would have exported it."""
    folder.mkdir(parents=True)
    for f in artifacts.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(name=folder.name, ticker=ticker, version=version or meta["version"])
    meta["data"]["file"] = str(ROOT / "data" / f"{ticker}.csv")
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def vale3_store(artifacts, tmp_path) -> Path:
    """An archive that says it serves VALE3.SA (the petr4 model with VALE3's meta.json fields)."""
    own = as_ticker(artifacts, tmp_path / "vale3", "VALE3.SA")
    return build_archive(own, tmp_path / "store-vale3", handlers=ROOT / "handlers").parent


@pytest.fixture(scope="module")
def tokened(mar, tmp_path_factory):
    """A server started with start()'s defaults: token authorization on."""
    srv = start(mar.parent, tmp_path_factory.mktemp("tokened"), handlers=ROOT / "handlers",
                ports=free_ports())
    try:
        yield srv
    finally:
        stop(srv)


@pytest.mark.slow
def test_without_the_management_key_nobody_can_change_what_is_served(tokened):
    # over gRPC the same TorchServe interceptor checks the same key (not tested: no grpcio here)
    store = next((tokened.home / "store").glob("lstm-*.mar")).name
    for headers in ({}, {"Authorization": "Bearer wrong"}, tokened.headers("inference")):
        assert request("PUT", f"{tokened.management}/models/lstm?min_worker=0&synchronous=true",
                       headers) == 400
        # the model API is on (a new ticker joins without a restart), behind the same key
        assert request("POST", f"{tokened.management}/models?url={store}&model_name=x", headers) == 400
        assert request("DELETE", f"{tokened.management}/models/lstm", headers) == 400
    # with the key, still nothing from outside the server's own store: no URL is allowed
    for outside in ("http://127.0.0.1:9/x.mar", "file:///etc/passwd", "../lstm.mar"):
        assert request("POST", f"{tokened.management}/models?url={outside}&model_name=x",
                       tokened.headers("management")) in (400, 404)
    assert workers(tokened) == ["READY", "READY"]
    assert post(url(tokened), json.dumps(ORIGINAL), headers=tokened.headers())[0] == 200


@pytest.mark.slow
def test_status_and_the_healthcheck_fail_when_no_worker_can_answer(tokened):
    home = str(tokened.home)
    assert serve("status", "--home", home).returncode == 0
    assert healthcheck(tokened).returncode == 0
    scale = f"{tokened.management}/models/lstm?synchronous=true&min_worker="
    try:
        assert request("PUT", scale + "0&max_worker=0", tokened.headers("management")) == 200
        assert workers(tokened) == []
        # TorchServe's /ping cannot tell: Healthy with no worker at all
        assert get(f"{tokened.inference}/ping", tokened.headers()) == (200, '{\n  "status": "Healthy"\n}\n')
        status = serve("status", "--home", home)
        assert status.returncode == 4 and "no worker of lstm is READY" in status.stderr
        assert healthcheck(tokened).returncode == 1
    finally:
        request("PUT", scale + "2&max_worker=2", tokened.headers("management"))
    assert workers(tokened) == ["READY", "READY"]
    assert healthcheck(tokened).returncode == 0 and serve("status", "--home", home).returncode == 0


@pytest.mark.slow
def test_status_fails_when_the_key_is_refused_and_token_prints_the_key(tokened):
    token = serve("token", "--home", str(tokened.home))
    assert token.returncode == 0 and token.stdout.strip() == tokened.token()
    keys = tokened.home / "key_file.json"
    saved = keys.read_text()
    try:  # what an expired key looks like: TorchServe answers it with 400
        keys.write_text(saved.replace(tokened.token("management"), "expired"))
        status = serve("status", "--home", str(tokened.home))
        assert status.returncode == 4 and "refused the management key" in status.stderr
    finally:
        keys.write_text(saved)


def test_a_stale_pid_in_server_json_is_never_signalled(tmp_path):
    # a daemon that got the pid of a server gone long ago: its own process group, like TorchServe's
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stat = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        for record in ({"pid": sleeper.pid, "ports": list(free_ports()), "archive_sha256": "x"},
                       {"pid": sleeper.pid, "started": int(stat[19]), "boot_id": boot,
                        "ports": list(free_ports()), "token_auth": True, "archive_sha256": "x"}):
            (tmp_path / "server.json").write_text(json.dumps(record))
            status = serve("status", "--home", str(tmp_path))
            assert status.returncode == 3 and status.stderr.strip() == "TorchServe is not running"
            stopped = serve("stop", "--home", str(tmp_path))
            assert stopped.returncode == 0 and "TorchServe is not running" in stopped.stdout
            assert f"pid {sleeper.pid}" in stopped.stderr and "left alone" in stopped.stderr
            assert sleeper.poll() is None  # still running: nothing was signalled
            assert not (tmp_path / "server.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_server_that_cannot_load_fails_fast_with_the_cause_in_one_line(mar, tmp_path):
    store = broken_archive(mar, tmp_path / "store")
    begun = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        start(store, tmp_path / "ts", handlers=ROOT / "handlers", ports=free_ports())
    took = time.monotonic() - begun
    message = str(err.value)
    assert "\n" not in message and "did not become ready" in message and "INVALID_PROTOBUF" in message
    assert took < 40, took  # the worker's failure, not the 120 s timeout
    print(f"failed after {took:.1f} s: {message}")


@pytest.mark.slow
def test_start_checks_an_archive_before_it_stops_anything_and_restarts_on_other_settings(
        mar, vale3_store, tmp_path):
    home, old, new = tmp_path / "home", free_ports(), free_ports()
    try:
        first = serve("start", "--model-store", str(vale3_store), "--home", str(home),
                      "--ports", *map(str, old))
        assert first.returncode == 0, first.stderr
        pid = json.loads((home / "server.json").read_text())["pid"]
        # the printed curl works as printed and sends VALE3's own closes, not PETR4's
        curl = first.stdout.split("forecast: ", 1)[1].strip()
        sent = json.loads(Path(shlex.split(curl)[-1].lstrip("@")).read_text())["history"]
        vale3 = load_prices(ROOT / "data" / "VALE3.SA.csv")["close"]
        meta = json.loads(zipfile.ZipFile(vale3_store / "lstm.mar").read("meta.json"))
        assert sent == pytest.approx(list(vale3[: meta["data"]["end"]].tail(60)))
        answer = json.loads(subprocess.run(curl, shell=True, cwd=ROOT, capture_output=True,
                                           text=True, timeout=30).stdout)
        assert answer["model"]["ticker"] == "VALE3.SA"

        # an archive whose checksums pass but which cannot load: refused, the server untouched
        broken = broken_archive(mar, tmp_path / "broken")
        refused = serve("start", "--model-store", str(broken), "--home", str(home),
                        "--ports", *map(str, old))
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"error: {broken}/lstm.mar cannot serve: InvalidProtobuf")
        assert len(refused.stderr.strip().splitlines()) == 1
        assert json.loads((home / "server.json").read_text())["pid"] == pid
        assert serve("status", "--home", str(home)).returncode == 0  # the same server, still READY

        # other ports and token auth off: not ignored, a restart that says why
        again = serve("start", "--model-store", str(vale3_store), "--home", str(home),
                      "--ports", *map(str, new), "--no-token-auth")
        assert again.returncode == 0, again.stderr
        assert ("warning: token authorization off: any local process can change serving state"
                in again.stderr)
        assert (f"ports {' '.join(map(str, old))} -> {' '.join(map(str, new))}; token auth off: "
                "restarting it") in again.stdout
        assert busy(old) == []  # the old server is gone
        status, body = post(f"http://127.0.0.1:{new[0]}/predictions/lstm", json.dumps(ORIGINAL))
        assert status == 200 and body["model"]["ticker"] == "VALE3.SA"  # no key needed now
    finally:
        serve("stop", "--home", str(home))


def our_processes(home: Path) -> list[int]:
    """Processes whose command line names `home`: the launcher, Java and the workers of its server."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(home).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_stop_during_a_start_waits_for_it_then_stops_exactly_that_server(mar, tmp_path):
    home, ports = tmp_path / "home", [str(p) for p in free_ports()]
    args = ["--home", str(home), "--model-store", str(mar.parent), "--ports", *ports]
    run = [sys.executable, "-m", "stockcast.serve"]
    starting = subprocess.Popen([*run, "start", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "server.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        record = json.loads((home / "server.json").read_text())  # written, the server not ready yet
        stopping = subprocess.Popen([*run, "stop", "--home", str(home)], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started, stopped = starting.communicate(timeout=180), stopping.communicate(timeout=180)
    finally:
        serve("stop", "--home", str(home))
    assert starting.returncode == 0 and "TorchServe is serving lstm" in started[0], started
    assert stopping.returncode == 0 and "waiting for another serve command" in stopped[1]
    assert stopped[0].strip() == f"stopped TorchServe (pid {record['pid']})"
    assert our_processes(home) == [] and busy(map(int, ports)) == []
    assert serve("stop", "--home", str(home)).stdout.strip() == "TorchServe is not running"


def test_a_command_waits_for_the_one_holding_the_lock(tmp_path):
    """The lock: a command on a folder another command holds waits, and says so."""
    import fcntl

    home = tmp_path / "home"
    home.mkdir()
    (home / "server.json").write_text("{}")
    with open(home / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "stockcast.serve", "stop", "--home", str(home)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert proc.poll() is None  # waiting
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "waiting for another serve command" in err


@pytest.mark.slow
def test_a_server_whose_record_is_gone_is_still_found(tokened):
    """server.json deleted (with logs/, say): status and stop find the server by its command line,
    instead of saying "not running" while it holds the ports."""
    record = tokened.home / "server.json"
    saved = record.read_text()
    record.unlink()
    try:
        status = serve("status", "--home", str(tokened.home))
        assert status.returncode == 0 and f"pid {tokened.pid}" in status.stdout, status.stderr
    finally:
        record.write_text(saved)


def answering(address: str, key: str | None, seconds: float) -> tuple[list, threading.Thread]:
    """A client forecasting in a loop on `address` for `seconds`: the statuses it got, and its thread."""
    statuses: list = []

    def loop():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            statuses.append(post(address, json.dumps(ORIGINAL), headers=headers)[0])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return statuses, thread


@pytest.mark.slow
def test_every_archive_is_served_under_its_name_and_a_new_one_joins_without_a_restart(
        mar, artifacts, tmp_path):
    store, home, ports = tmp_path / "store", tmp_path / "home", [str(p) for p in free_ports()]
    args = ["--model-store", str(store), "--home", str(home), "--ports", *ports]
    store.mkdir()
    (store / "lstm.mar").write_bytes(mar.read_bytes())
    for name, ticker in (("vale3", "VALE3.SA"), ("itub4", "ITUB4.SA")):
        build_archive(as_ticker(artifacts, tmp_path / "a" / name, ticker), store,
                      handlers=ROOT / "handlers", overrides=OTHER_TICKERS, name=name)
    itub4 = (store / "itub4.mar").rename(tmp_path / "itub4.mar")  # added later
    (store / "notes.txt").write_text("not an archive")
    try:
        first = serve("start", *args)
        assert first.returncode == 0, first.stderr
        assert "TorchServe is serving lstm, vale3 (pid" in first.stdout
        pid = json.loads((home / "server.json").read_text())["pid"]
        key = (home / "key_file.json").exists() and json.loads((home / "key_file.json").read_text())
        inference = f"http://127.0.0.1:{ports[0]}/predictions"
        auth = {"Authorization": f"Bearer {key['inference']['key']}"}
        for name, ticker in (("lstm", "PETR4.SA"), ("vale3", "VALE3.SA")):
            status, body = post(f"{inference}/{name}", json.dumps(ORIGINAL), headers=auth)
            assert status == 200 and body["model"]["ticker"] == ticker and body["model"]["name"] == name
        status = serve("status", "--home", str(home))
        assert status.returncode == 0
        lines = [line.split() for line in status.stdout.splitlines() if line.startswith("  ")]
        assert [(w[0], w[1], w[5]) for w in lines] == [("lstm", "PETR4.SA", "2/2"),
                                                       ("vale3", "VALE3.SA", "1/1")]

        # a new ticker: registered in place while a client keeps forecasting, nothing dropped
        (store / "itub4.mar").write_bytes(itub4.read_bytes())
        statuses, client = answering(f"{inference}/lstm", key["inference"]["key"], 8)
        added = serve("start", *args)
        client.join()
        assert added.returncode == 0, added.stderr
        assert "added itub4 (ITUB4.SA, version" in added.stdout and "without a restart" in added.stdout
        assert json.loads((home / "server.json").read_text())["pid"] == pid
        assert len(statuses) > 20 and set(statuses) == {200}, statuses
        status, body = post(f"{inference}/itub4", json.dumps(ORIGINAL), headers=auth)
        assert status == 200 and body["model"]["ticker"] == "ITUB4.SA"
        assert serve("status", "--home", str(home)).stdout.count("READY") == 3
        print(f"{len(statuses)} forecasts during the registration, all 200")

        # nothing changed: nothing done; a model gone from the store: unregistered in place
        assert "already serving these archives" in serve("start", *args).stdout
        (store / "vale3.mar").unlink()
        again = serve("start", *args)
        assert again.returncode == 0 and "removed vale3" in again.stdout, again.stdout
        assert json.loads((home / "server.json").read_text())["pid"] == pid
        assert post(f"{inference}/vale3", json.dumps(ORIGINAL), headers=auth)[0] == 404
        # the copies of archives no longer served are pruned
        assert sorted(f.name.split("-")[0] for f in (home / "store").glob("*.mar")) == ["itub4", "lstm"]

        # a new version of the default model: swapped in under a steady load, no request failed
        old = json.loads((home / "server.json").read_text())["models"]["lstm"]["version"]
        new = str(int(old) + 1)
        build_archive(artifacts, store, handlers=ROOT / "handlers", version=new)
        loads = [answering(f"{inference}/lstm", key["inference"]["key"], 12) for _ in range(2)]
        began = time.monotonic()
        swapped = serve("start", *args)
        took = time.monotonic() - began
        for _, thread in loads:
            thread.join()
        assert swapped.returncode == 0, swapped.stderr
        assert f"version {old} -> {new} at /predictions/lstm without a restart" in swapped.stdout
        answered = [s for statuses, _ in loads for s in statuses]
        assert len(answered) > 50 and set(answered) == {200}, answered
        assert post(f"{inference}/lstm", json.dumps(ORIGINAL), headers=auth)[1]["model"]["version"] == new
        code, body = get(f"http://127.0.0.1:{ports[1]}/models/lstm/all", {
            "Authorization": f"Bearer {key['management']['key']}"})
        assert [m["modelVersion"] for m in json.loads(body)] == [new]  # the old version unregistered
        assert json.loads((home / "server.json").read_text())["pid"] == pid
        print(f"swap: {took:.1f} s, {len(answered)} forecasts during it, all 200")
    finally:
        serve("stop", "--home", str(home))


@pytest.mark.slow
def test_an_interrupted_registration_is_finished_and_a_lost_record_names_what_is_served(
        mar, artifacts, tmp_path):
    """A registration whose server.json update never happened (the command killed after TorchServe
    registered the model) is adopted by the next start, not refused with a 409 forever; with
    server.json gone, status reads what TorchServe serves, not a leftover copy in the store."""
    from stockcast.serve import describe, put_in_place, running, stage

    store, home, ports = tmp_path / "store", tmp_path / "home", [str(p) for p in free_ports()]
    args = ["--model-store", str(store), "--home", str(home), "--ports", *ports]
    store.mkdir()
    (store / "lstm.mar").write_bytes(mar.read_bytes())
    try:
        assert serve("start", *args).returncode == 0
        build_archive(as_ticker(artifacts, tmp_path / "a" / "vale3", "VALE3.SA"), store,
                      handlers=ROOT / "handlers", overrides=OTHER_TICKERS, name="vale3")
        server, _ = running(home)
        data = (store / "vale3.mar").read_bytes()
        model = describe("vale3", data)
        model["file"] = stage(home, "vale3", data, model["sha256"])
        put_in_place(server, "vale3", model)  # registered, the record never updated
        # and a copy staged by a registration that never reached TorchServe
        (home / "store" / "itub4-0123456789abcdef.mar").write_bytes(data)
        again = serve("start", *args)
        assert again.returncode == 0 and "added vale3" in again.stdout, again.stderr
        assert json.loads((home / "server.json").read_text())["models"]["vale3"]["file"] == model["file"]
        (home / "server.json").unlink()
        status = serve("status", "--home", str(home))
        assert status.returncode == 0, status.stderr
        names = [line.split()[0] for line in status.stdout.splitlines() if line.startswith("  ")]
        assert names == ["lstm", "vale3"], status.stdout
    finally:
        serve("stop", "--home", str(home))


@pytest.mark.slow
def test_without_token_auth_the_management_api_cannot_register_and_an_addition_restarts(
        mar, artifacts, tmp_path):
    store, home, ports = tmp_path / "store", tmp_path / "home", [str(p) for p in free_ports()]
    args = ["--model-store", str(store), "--home", str(home), "--ports", *ports, "--no-token-auth"]
    store.mkdir()
    (store / "lstm.mar").write_bytes(mar.read_bytes())
    try:
        assert serve("start", *args).returncode == 0
        management = f"http://127.0.0.1:{ports[1]}"
        # what a local process without a key would try: TorchServe's model API is off
        assert request("POST", f"{management}/models?url=lstm.mar&model_name=x") in (400, 404, 405)
        assert request("DELETE", f"{management}/models/lstm") in (400, 404, 405)
        build_archive(as_ticker(artifacts, tmp_path / "a" / "vale3", "VALE3.SA"), store,
                      handlers=ROOT / "handlers", overrides=OTHER_TICKERS, name="vale3")
        added = serve("start", *args)
        assert added.returncode == 0 and "vale3 changed (token auth off" in added.stdout
        assert "TorchServe is serving lstm, vale3" in added.stdout
    finally:
        serve("stop", "--home", str(home))
