"""deploy/k8s/overlays/scale-out: pods that share one key, checked by an nginx sidecar.

Offline, the rendered manifests; for real, the sidecar's nginx config rendered as the nginx image
renders it (envsubst with a key) and run by Debian's nginx in front of a TorchServe started as the
overlay configures it (token check off, APIs on loopback); and the stockcast image's part of the
pod in podman (make image; skipped without it). No cluster, and no nginx image (no registry here).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ORIGINAL, post
from test_manifests import K8S, ROOT, SCALE_OUT, by_kind, container, docker_ports, podman_image, render

from stockcast.serve import free_ports

SHARED = ROOT / "deploy" / "nginx" / "stockcast.conf"
TEMPLATE = SCALE_OUT / "stockcast.conf.template"
MAIN = SCALE_OUT / "nginx.conf"
KEY = "0123456789abcdef" * 4  # as `openssl rand -hex 32` makes them
AUTH_BLOCK = re.compile(r"^ *# --- auth: begin\n.*?^ *# --- auth: end\n", re.M | re.S)


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(SCALE_OUT)


def pod_of(rendered: list[dict]) -> dict:
    return by_kind(rendered, "Deployment")["spec"]["template"]["spec"]


def directives(text: str) -> list[str]:
    """nginx config lines without comments, blank lines and indentation (no '#' in its strings)."""
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def seeded_config(rendered: list[dict], folder: Path, source: Path) -> subprocess.CompletedProcess:
    """The "config" init container's script, run on a copy of `source` (what "home" copies)."""
    init = container(pod_of(rendered), "config", "initContainers")
    shell, flags, script = init["command"]
    (mount,) = init["volumeMounts"]
    shutil.copy(source, folder / "config.properties")
    return subprocess.run([shell, flags, script.replace(mount["mountPath"], str(folder))],
                          capture_output=True, text=True, timeout=30)


# ---- offline --------------------------------------------------------------------------------------

def test_the_sidecar_config_is_the_proxy_config_plus_the_key_check() -> None:
    """One set of timeouts and limits: the copy kustomize can read differs in the upstream only."""
    template = TEMPLATE.read_text()
    assert len(AUTH_BLOCK.findall(template)) == 1
    shared = directives(SHARED.read_text())
    assert shared.count("server torchserve:8080;") == 1
    shared[shared.index("server torchserve:8080;")] = "server 127.0.0.1:8085;"
    assert directives(AUTH_BLOCK.sub("", template)) == shared
    # the check sits at server level, so it runs before any location (ping, predictions, 404s)
    auth = directives(AUTH_BLOCK.search(template)[0])
    assert auth[0] == 'if ($http_authorization != "Bearer ${STOCKCAST_INFERENCE_KEY}") {'


def test_the_init_container_puts_torchserve_on_loopback_with_its_check_off(rendered, tmp_path) -> None:
    done = seeded_config(rendered, tmp_path, ROOT / "handlers" / "config.docker.properties")
    assert done.returncode == 0, done.stderr
    props = properties((tmp_path / "config.properties").read_text())
    assert props["inference_address"] == "http://127.0.0.1:8085"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["metrics_address"] == "http://0.0.0.0:8082"  # Prometheus scrapes the pod's IP
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "true"
    # nginx's upstream is that address; the probe asks the management API where it now listens
    assert "server 127.0.0.1:8085;" in TEMPLATE.read_text()
    healthcheck = (ROOT / "deploy" / "image" / "healthcheck.py").read_text()
    assert f'default="{props["management_address"]}"' in healthcheck
    # a config whose lines moved stops the pod instead of leaving TorchServe open
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (ROOT / "handlers" / "config.docker.properties").read_text().splitlines()
    (tmp_path / "old.properties").write_text("\n".join(x for x in lines if not x.startswith("inference_")))
    assert seeded_config(rendered, broken, tmp_path / "old.properties").returncode != 0


def test_the_pods_share_the_secrets_key_through_the_sidecar(rendered) -> None:
    pod = pod_of(rendered)
    assert [c["name"] for c in pod["initContainers"]] == ["home", "config"]  # copy, then edit
    assert [c["name"] for c in pod["containers"]] == ["torchserve", "nginx"]  # exec's default first
    nginx = container(pod, "nginx")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert nginx["image"] == compose["services"]["proxy"]["image"] == "nginx:1.27"  # pinned
    env = {e["name"]: e for e in nginx["env"]}
    assert env["STOCKCAST_INFERENCE_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "stockcast-inference-key", "key": "key"}
    # the image substitutes only variables named like the filter: every one the template uses is set
    used = set(re.findall(r"\$\{?(\w+)", TEMPLATE.read_text()))
    prefix = env["NGINX_ENVSUBST_FILTER"]["value"]
    assert {v for v in used if v.startswith(prefix)} == {"STOCKCAST_INFERENCE_KEY"}
    assert not {v for v in used if v.isupper()} - {"STOCKCAST_INFERENCE_KEY"}
    # the files sit where the image's entrypoint and the main config look for them
    mounts = {m["mountPath"]: m for m in nginx["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    generated = by_kind(rendered, "ConfigMap")
    assert set(generated["data"]) == {MAIN.name, TEMPLATE.name}
    for path, name in (("/etc/nginx/nginx.conf", MAIN.name),
                       (f"/etc/nginx/templates/{TEMPLATE.name}", TEMPLATE.name)):
        assert mounts[path]["subPath"] == name
        assert volumes[mounts[path]["name"]]["configMap"]["name"] == generated["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/etc/nginx/conf.d"]["name"]]  # rendered at start, read-only root
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    main = MAIN.read_text()
    assert "include /etc/nginx/conf.d/*.conf;" in main
    paths = re.findall(r"^\s*(?:pid|\w+_temp_path)\s+(\S+);", main, re.M)
    assert len(paths) == 6 and all(p.startswith("/tmp/") for p in paths)
    # the Service sends inference to the sidecar, metrics straight to TorchServe
    named = {p["name"]: (c["name"], p["containerPort"]) for c in pod["containers"] for p in c["ports"]}
    assert named == {"http-inference": ("nginx", 8080), "http-metrics": ("torchserve", 8082)}
    service = by_kind(rendered, "Service")
    assert {(p["port"], named[p["targetPort"]][0]) for p in service["spec"]["ports"]} == {
        (8080, "nginx"), (8082, "torchserve")}
    assert "listen 8080;" in TEMPLATE.read_text() and docker_ports()["metrics"] == 8082
    (rule,) = by_kind(rendered, "NetworkPolicy")["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {8080, 8082}


def test_the_autoscaler_owns_the_count(rendered) -> None:
    deployment, hpa = by_kind(rendered, "Deployment"), by_kind(rendered, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["averageUtilization"] == 70
    # a Resource metric needs a CPU request on every container, the sidecar's too
    assert all(c["resources"]["requests"]["cpu"] for c in pod_of(rendered)["containers"])
    assert "HorizontalPodAutoscaler" not in {o["kind"] for o in render(K8S)}


# ---- for real: Debian's nginx with the rendered config, in front of a real TorchServe -------------

@pytest.fixture(scope="module")
def plain_server(mar, tmp_path_factory):
    """TorchServe as the overlay runs it: token check off, gRPC on loopback (from the init script)."""
    from stockcast.serve import start, stop

    folder = tmp_path_factory.mktemp("seeded")
    done = seeded_config(render(SCALE_OUT), folder, ROOT / "handlers" / "config.docker.properties")
    assert done.returncode == 0, done.stderr
    props = properties((folder / "config.properties").read_text())
    home = tmp_path_factory.mktemp("torchserve")
    srv = start(mar.parent, home, handlers=ROOT / "handlers", ports=free_ports(),
                token_auth=props["disable_token_authorization"] != "true",
                settings={k: props[k] for k in ("grpc_inference_address", "grpc_management_address")})
    try:
        yield srv
    finally:
        stop(srv)


@contextlib.contextmanager
def sidecar(tmp: Path, key: str, upstream: int):
    """The sidecar's nginx: the template rendered as the image does, paths moved into `tmp`."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary) or not shutil.which("envsubst"):
        if os.environ.get("CI") == "true":
            pytest.fail("nginx or envsubst missing in CI: .ci/run installs Debian's nginx")
        pytest.skip("nginx or envsubst not installed: apt-get install nginx gettext-base")
    port = free_ports(1)[0]
    # the image's 20-envsubst-on-templates.sh: only the variables that are set and pass the filter
    done = subprocess.run(["envsubst", "${STOCKCAST_INFERENCE_KEY}"], input=TEMPLATE.read_text(),
                          env={"STOCKCAST_INFERENCE_KEY": key}, capture_output=True, text=True, check=True)
    conf = done.stdout
    for old, new in (("server 127.0.0.1:8085;", f"server 127.0.0.1:{upstream};"),
                     ("listen 8080;", f"listen 127.0.0.1:{port};")):
        assert conf.count(old) == 1
        conf = conf.replace(old, new)
    (tmp / "conf.d").mkdir()
    (tmp / "conf.d" / TEMPLATE.stem).write_text(conf)
    main = MAIN.read_text()
    assert main.count("/tmp/") == 6 and main.count("/etc/nginx/conf.d/") == 1
    main = main.replace("/tmp/", f"{tmp}/").replace("/etc/nginx/conf.d/", f"{tmp}/conf.d/")
    if os.geteuid() == 0:  # workers must reach the pytest tmp folder; the pod's user is not root
        main = "user root;\n" + main
    (tmp / "nginx.conf").write_text(main)
    proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group of the master we started: it and its worker
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def proxy(plain_server, tmp_path_factory):
    with sidecar(tmp_path_factory.mktemp("sidecar"), KEY, plain_server.ports[0]) as port:
        yield port


def ask(port: int, authorization: list[str], method: str = "POST", body: bytes | None = None):
    """(status, headers, JSON or text) with the Authorization header lines given, in that order."""
    body = json.dumps(ORIGINAL).encode() if body is None else body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, "/predictions/lstm")
        for value in authorization:
            conn.putheader("Authorization", value)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        conn.close()
    with contextlib.suppress(ValueError):
        return response.status, response.headers, json.loads(text)
    return response.status, response.headers, text


@pytest.mark.slow
def test_the_right_key_gets_a_forecast(proxy, plain_server) -> None:
    status, _, answer = ask(proxy, [f"Bearer {KEY}"])
    assert (status, answer) == post(plain_server, json.dumps(ORIGINAL)) and status == 200
    assert answer["forecast"] and answer["model"]["name"] == "lstm"
    # the proxy's own rules still apply behind the key
    assert ask(proxy, [f"Bearer {KEY}"], method="GET")[0] == 405
    assert ask(proxy, [f"Bearer {KEY}"], body=b'{"history": [1]}')[2]["reason"] == "too_short"


@pytest.mark.slow
@pytest.mark.parametrize("authorization", [
    [], [""], ["Bearer"], ["Bearer "], [KEY], ["Bearer wrong"], [f"Bearer {KEY}x"], [f"Bearer x{KEY}"],
    [f"Bearer {KEY[:-1]}"], [f"Bearer  {KEY}"], [f"bearer {KEY}"], [f"Bearer {KEY.upper()}"],
    [f"Basic {KEY}"], [f"Bearer {KEY}, Bearer {KEY}"],
    [f"Bearer {KEY}", "Bearer wrong"], ["Bearer wrong", f"Bearer {KEY}"], [f"Bearer {KEY}", f"Bearer {KEY}"],
], ids=lambda a: repr(a)[:40])
def test_anything_but_the_exact_key_is_refused(proxy, authorization) -> None:
    status, headers, answer = ask(proxy, authorization)
    if len(authorization) > 1:  # nginx's own "duplicate header line" 400, before any config runs
        assert status == 400
        return
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert (answer["code"], answer["type"], answer["reason"]) == (401, "Unauthorized", "unauthorized")
    assert answer["message"]
    assert ask(proxy, authorization, method="GET")[0] == 401  # the key first, then the other checks


@pytest.mark.slow
def test_the_key_guards_every_path(proxy) -> None:
    for path in ("/ping", "/models", "/predictions/lstm", "/"):
        conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=10)
        conn.request("GET", path)
        assert conn.getresponse().status == 401, path
        conn.close()


@pytest.mark.slow
def test_an_empty_key_locks_everyone_out(plain_server, tmp_path) -> None:
    with sidecar(tmp_path, "", plain_server.ports[0]) as port:
        for authorization in ([], [""], ["Bearer"], ["Bearer "]):
            assert ask(port, authorization)[0] == 401, authorization


@pytest.mark.slow
def test_torchserve_behind_the_sidecar_is_pod_local_and_healthy(plain_server) -> None:
    """No key file with the check off: the probe asks the loopback management API without one."""
    assert not (plain_server.home / "key_file.json").exists()
    probe = subprocess.run([sys.executable, str(ROOT / "deploy" / "image" / "healthcheck.py"),
                            "--url", plain_server.management, "--key-file",
                            str(plain_server.home / "key_file.json"), "--timeout", "4"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    # metrics need no key (Prometheus scrapes 8082 on the pod's IP directly)
    conn = http.client.HTTPConnection("127.0.0.1", plain_server.ports[2], timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and b"ts_inference_requests_total" in response.read()
    conn.close()
    # the gRPC APIs, which TorchServe always opens, listen on loopback only (/proc/net/tcp: 0A LISTEN;
    # 0.12's default too, which the init script states explicitly)
    grpc = set(plain_server.ports[3:5])
    listening = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:] + \
            Path("/proc/net/tcp6").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.rsplit(":", 1)
        if state == "0A" and int(port, 16) in grpc:
            listening[int(port, 16)] = address
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, as itself or IPv4-mapped
    assert set(listening) == grpc and set(listening.values()) <= loopback, listening


# ---- the stockcast image's part of the pod, in podman (the nginx image is not here: no registry) ----

LISTENING = """import pathlib
for name in ("tcp", "tcp6"):
    for line in pathlib.Path("/proc/net/" + name).read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            address, port = local.rsplit(":", 1)
            print(int(port, 16), address)
"""


@pytest.mark.slow
def test_the_images_torchserve_runs_as_the_overlay_configures_it_in_podman(tmp_path: Path) -> None:
    """Both init containers, then TorchServe, as in test_manifests' podman test: the script works
    with the image's sh and sed, the APIs listen on loopback and metrics on every address, no key
    file is written and the probe passes without one."""
    image = podman_image()
    pod = pod_of(render(SCALE_OUT))
    main = container(pod)
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    folders = {v["name"]: tmp_path / v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for folder in folders.values():
        folder.mkdir()
        os.chown(folder, uid, gid)
    common = ["--user", f"{uid}:{gid}", "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "--network", "none"]

    def mounts(spec: dict) -> list[str]:
        return [arg for m in spec["volumeMounts"] for arg in (
            "-v", f"{folders[m['name']] / m.get('subPath', '')}:{m['mountPath']}"
                  + (":ro" if m.get("readOnly") else ""))]

    for init in pod["initContainers"]:
        entry, *rest = init["command"]
        done = subprocess.run(["podman", "run", "--rm", *common, *mounts(init), "--entrypoint", entry, image,
                               *rest], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (init["name"], done.stderr)
    name = f"stockcast-scale-out-{os.getpid()}"
    env = [f"--env={e['name']}={e['value']}" for e in main["env"]]
    started = subprocess.run(["podman", "run", "-d", "--name", name, *common, *mounts(main), *env, image],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["podman", "exec", name, *main["startupProbe"]["exec"]["command"]],
                             capture_output=True, timeout=30).returncode:
            assert time.monotonic() < deadline, subprocess.run(["podman", "logs", name], capture_output=True,
                                                               text=True).stdout[-3000:]
            time.sleep(1)
        assert not (folders["home"] / "key_file.json").exists()
        listing = subprocess.run(["podman", "exec", name, "python", "-c", LISTENING], capture_output=True,
                                 text=True, timeout=30).stdout.split()
        listening = dict(zip(map(int, listing[::2]), listing[1::2], strict=True))
        loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
        assert listening[8085] in loopback and listening[8081] in loopback, listening
        assert set(listening[8082]) == {"0"}, listening  # 0.0.0.0 or ::
        assert 8080 not in listening  # the sidecar's port
        ask = ("import json, sys, urllib.request as r\n"
               "request = r.Request('http://127.0.0.1:8085/predictions/lstm', sys.stdin.buffer.read(),"
               " {'Content-Type': 'application/json'})\n"
               "print(json.load(r.urlopen(request, timeout=10))['prediction'])")
        answer = subprocess.run(["podman", "exec", "-i", name, "python", "-c", ask], capture_output=True,
                                input=json.dumps(ORIGINAL).encode(), timeout=60)
        assert answer.returncode == 0 and float(answer.stdout) > 0, answer.stderr
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "10", name], capture_output=True, timeout=60)
