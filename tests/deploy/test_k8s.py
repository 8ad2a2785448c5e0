"""deploy/k8s, rendered (kustomize, or tests/deploy/kustomize_lite.py) and validated offline against the Kubernetes
schemas (kubernetes-validate). The pod runs the commands and healthchecks compose.yaml runs, sized consistently.
"""
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kustomize_lite import render
from test_compose import CONFIGS, image_env, interpolate, load

from services.cli import build_parser
from common.config import build_config
from common.sizes import parse_size

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TREES = {"base": K8S / "base", "example": K8S / "overlays" / "example"}
# native sidecars (restartPolicy: Always on an init container) are on by default from 1.29
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SHM_MARGIN, MEMD_OVERHEAD = 256 << 20, 512 << 20


@pytest.fixture(scope="module", params=sorted(TREES))
def tree(request):
    return request.param, render(TREES[request.param])


def one(docs, kind, name="moeinf"):
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod(docs) -> dict:
    return one(docs, "StatefulSet")["spec"]["template"]["spec"]


def containers(docs) -> dict:
    spec = pod(docs)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def quantity(text) -> float:
    """Kubernetes quantities: 9Gi, 8448Mi, 500m, 4."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT]|m)?", str(text)).groups()
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[unit]
    return float(number) * scale


def env_of(container) -> dict:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# ---------------------------------------------------------------- rendering and schemas
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("name", sorted(TREES))
def test_renderer_agrees_with_kubectl_kustomize(name):
    out = subprocess.run(["kubectl", "kustomize", str(TREES[name])], capture_output=True, text=True, check=True)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(render(TREES[name]), key=key)


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(tree, version):
    name, docs = tree
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on an unknown field or a bad type


def test_a_broken_manifest_fails_validation(tree):
    """The validation above can fail: a misspelled field is caught."""
    statefulset = one(tree[1], "StatefulSet")
    broken = yaml.safe_load(yaml.safe_dump(statefulset))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- the pod
def test_one_pod_per_host_with_memd_as_a_sidecar_of_worker_and_gateway(tree):
    spec = pod(tree[1])
    assert [c["name"] for c in spec["initContainers"]] == ["memd"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always", "memd runs for the pod's life, started first"
    assert [c["name"] for c in spec["containers"]] == ["worker", "gateway"]
    assert spec["shareProcessNamespace"] is True, "memd and the worker check each other's pid"
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == one(tree[1], "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert spec["securityContext"]["runAsUser"] == 1000 and spec["securityContext"]["fsGroup"] == 1000
    assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", "else /state turns group-writable"


def test_containers_run_the_compose_commands_and_healthchecks(tree):
    services = load("compose.yaml")["services"]
    for name, container in containers(tree[1]).items():
        command = container["command"]
        variables = {"MOEINF_EXPERT_MEMORY": command[-1]} if name == "memd" else {}
        assert command == [interpolate(a, variables) for a in services[name]["command"]], name
        health = [interpolate(a) for a in services[name]["healthcheck"]["test"][1:]]
        probes = [p for p in ("startupProbe", "livenessProbe", "readinessProbe") if "exec" in container.get(p, {})]
        assert "readinessProbe" in probes, name
        for probe in probes:
            assert container[probe]["exec"]["command"] == health, f"{name} {probe}"
    assert tree[0] != "base" or containers(tree[1])["memd"]["command"][-1] == "8GiB", "compose's default pool"


def service_links(docs) -> dict:
    """The variables the kubelet gives every container for each Service of the namespace (unless the pod says
    ``enableServiceLinks: false``): a Service ``moeinf`` sets ``MOEINF_PORT=tcp://...``, a moeinf knob's name."""
    if pod(docs).get("enableServiceLinks") is False:
        return {}
    env = {}
    for doc in docs:
        if doc["kind"] == "Service":
            name, port = doc["metadata"]["name"].upper().replace("-", "_"), doc["spec"]["ports"][0]["port"]
            env |= {f"{name}_SERVICE_HOST": "10.96.0.12", f"{name}_SERVICE_PORT": str(port),
                    f"{name}_PORT": f"tcp://10.96.0.12:{port}"}
    return env


def test_commands_and_probes_parse_into_valid_configs(tree):
    parser = build_parser()
    for name, container in containers(tree[1]).items():
        env = {**image_env(), **service_links(tree[1]), **env_of(container)}
        lines = [container["command"]] + [container[p]["exec"]["command"] for p in
                                          ("startupProbe", "livenessProbe", "readinessProbe")
                                          if "exec" in container.get(p, {})]
        for argv in lines:
            assert argv[0] == "moeinf"
            cfg = build_config(CONFIGS[argv[1]], parser.parse_args(argv[1:]), env=env)
            assert str(cfg.state_dir) == "/state", name
        if name in ("memd", "worker"):
            assert container["livenessProbe"]["exec"]["command"][:3] == ["moeinf", "health", name]


def test_shm_and_memory_are_sized_from_the_pool(tree):
    spec, memd = pod(tree[1]), containers(tree[1])["memd"]
    pool = parse_size(memd["command"][memd["command"].index("--expert-memory") + 1]).nbytes
    (shm,) = [v for v in spec["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert quantity(shm["emptyDir"]["sizeLimit"]) >= pool + SHM_MARGIN
    resources = memd["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"], "the pool is not burstable memory"
    assert quantity(resources["limits"]["memory"]) >= pool + MEMD_OVERHEAD, "shm pages are charged to memd"


def test_worker_cpu_request_is_its_thread_count(tree):
    worker = containers(tree[1])["worker"]
    threads = build_config(CONFIGS["worker"], build_parser().parse_args(worker["command"][1:]),
                           env={**image_env(), **env_of(worker)}).threads
    assert threads >= 1 and quantity(worker["resources"]["requests"]["cpu"]) == threads


def test_volumes_shm_state_and_a_read_only_checkpoint(tree):
    docs = tree[1]
    spec = pod(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["readOnly"] is True
    claims = [t["metadata"]["name"] for t in one(docs, "StatefulSet")["spec"]["volumeClaimTemplates"]]
    assert claims == ["state"] and "state" not in volumes, "/state is a per-pod PVC: the EAMC survives restarts"
    for name, container in containers(docs).items():
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/state"]["name"] == "state" and mounts["/model"]["readOnly"] is True, name
        if name in ("memd", "worker"):
            assert mounts["/dev/shm"]["name"] == "shm", f"{name} sees the pod's /dev/shm, where the pool lives"


def test_service_reaches_the_gateways_and_the_pdb_covers_the_pods(tree):
    docs = tree[1]
    labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    gateway = containers(docs)["gateway"]
    (named,) = [p for p in gateway["ports"] if p["name"] == port["targetPort"]]
    assert str(named["containerPort"]) == gateway["command"][gateway["command"].index("--port") + 1]
    assert one(docs, "StatefulSet")["spec"]["serviceName"] == "moeinf-pods"
    assert one(docs, "Service", "moeinf-pods")["spec"]["clusterIP"] == "None"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() and pdb["spec"]["maxUnavailable"] == 1


def test_the_overlay_changes_what_it_says():
    base, example = render(TREES["base"]), render(TREES["example"])
    assert {d["metadata"].get("namespace") for d in example} == {"moeinf"}
    assert one(example, "StatefulSet")["spec"]["replicas"] == 3
    assert {c["image"] for c in containers(example).values()} == {"registry.example.com/moeinf:0.1.0"}
    assert {c["image"] for c in containers(base).values()} == {"moeinf:latest"}
    assert containers(example)["memd"]["command"][-1] == "16GiB"


def test_kubernetes_validate_is_in_the_test_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(dep.startswith("kubernetes-validate") for dep in extra)
