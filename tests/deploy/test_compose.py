"""compose.yaml, compose.gpu.yaml and the Dockerfile, checked without a Docker engine (compose_e2e.sh runs them
on one, where an engine is available).

What is checked: the compose files parse and have the documented structure; every command and healthcheck they
run parses with moeinf's own CLI into a valid service config; the image's build context holds every COPY source;
the Dockerfile installs exactly what the README documents.
"""
import argparse
import copy
import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser
from common.config import GatewayConfig, MemdConfig, WorkerConfig, build_config
from common.sizes import parse_size
from services.health import HealthConfig

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("memd", "worker", "gateway")
CONFIGS = {"memd": MemdConfig, "worker": WorkerConfig, "gateway": GatewayConfig, "health": HealthConfig}
_VAR = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*)|(:?\?)[^}]*)?\}")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def interpolate(text: str, env: dict | None = None) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?error}`` with ``env`` (required variables get a placeholder)."""
    env = env or {}

    def one(match):
        name, dash, default, question = match.groups()
        if name in env:
            return env[name]
        if question:
            return f"/placeholder/{name.lower()}"
        return default if dash else ""
    return _VAR.sub(one, text)


def merged(*names: str) -> dict:
    """Compose's merge of override files: mappings merge key by key, anything else is replaced."""
    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base[key], value) if key in base else value
            return out
        return copy.deepcopy(over)
    result = {}
    for name in names:
        result = merge(result, load(name))
    return result


def docker_bytes(text: str) -> int:
    """Docker's memory sizes (shm_size): binary units, b/k/m/g with an optional trailing b."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)b?", text.strip().lower()).groups()
    return int(float(number) * 1024 ** "bkmgt".index(unit or "b"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("compose.yaml")


@pytest.fixture(scope="module")
def gpu() -> dict:
    return merged("compose.yaml", "compose.gpu.yaml")


def commands(compose: dict):
    """Every command line compose runs: each service's command and healthcheck, interpolated with defaults."""
    for name, service in compose["services"].items():
        yield name, [interpolate(arg) for arg in service["command"]]
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: an exec-form healthcheck, so no shell is needed in the image"
        yield f"{name} healthcheck", [interpolate(arg) for arg in test[1:]]


# ---------------------------------------------------------------- structure
def test_three_services_from_one_image(compose):
    assert set(compose["services"]) == set(SERVICES)
    images = {s["image"] for s in compose["services"].values()}
    assert len(images) == 1 and all(s["build"]["context"] == "." for s in compose["services"].values())


def test_base_image_is_a_build_argument_defaulting_to_python_slim(compose):
    assert dockerfile_args()["BASE_IMAGE"] == "python:3.11-slim"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile(), re.M)
    for service in compose["services"].values():
        assert interpolate(service["build"]["args"]["BASE_IMAGE"]) == "python:3.11-slim"
        assert set(service["build"]["args"]) <= set(dockerfile_args())


def test_no_compose_v2_only_keys(compose):
    """docker-compose 1.29 (Debian's) rejects depends_on.restart; compose_e2e.sh runs with either."""
    for name, service in compose["services"].items():
        for dependency in service.get("depends_on", {}).values():
            assert set(dependency) <= {"condition"}, name


def test_model_and_state_volumes_are_mounted_alike_everywhere(compose):
    assert "state" in compose["volumes"]
    for name, service in compose["services"].items():
        volumes = [interpolate(v) for v in service["volumes"]]
        assert "state:/state" in volumes, name
        model = [v for v in service["volumes"] if v.endswith(":/model:ro")]
        assert model and "${MOEINF_MODEL_DIR:?" in model[0], f"{name}: the model is a read-only bind mount"


def test_worker_shares_memds_ipc_and_pid_namespaces(compose):
    memd, worker = compose["services"]["memd"], compose["services"]["worker"]
    assert memd["ipc"] == "shareable"
    assert worker["ipc"] == "service:memd" and worker["pid"] == "service:memd"
    assert "shm_size" not in worker, "the worker uses memd's /dev/shm"
    gateway = compose["services"]["gateway"]
    assert gateway["pid"] == "service:memd", "the worker's pid means the same process in the gateway"
    assert "ipc" not in gateway and gateway["init"] is False and worker["init"] is False


def test_shm_size_holds_the_default_pool_with_margin(compose):
    memd = compose["services"]["memd"]
    assert "${MOEINF_SHM_SIZE:-" in memd["shm_size"]
    command = [interpolate(a) for a in memd["command"]]
    pool = parse_size(command[command.index("--expert-memory") + 1]).nbytes
    assert pool is not None, "the default --expert-memory is in bytes, so shm_size can be derived from it"
    assert docker_bytes(interpolate(memd["shm_size"])) >= pool + (256 << 20)


def test_healthchecks_gate_start_up_in_order(compose):
    services = compose["services"]
    for name in SERVICES:
        assert services[name]["healthcheck"]["test"][1:4] == ["moeinf", "health", name]
    assert services["worker"]["depends_on"]["memd"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["worker"]["condition"] == "service_healthy"
    assert "depends_on" not in services["memd"]


def test_gateway_port_is_published_and_listened_on(compose):
    gateway = compose["services"]["gateway"]
    (mapping,) = gateway["ports"]
    bind, published, container = interpolate(mapping).split(":")
    assert bind == "127.0.0.1", "loopback unless MOEINF_BIND opens it"
    assert interpolate(mapping, {"MOEINF_BIND": "0.0.0.0", "MOEINF_PORT": "80"}) == "0.0.0.0:80:8000"
    command = [interpolate(a) for a in gateway["command"]]
    assert command[command.index("--port") + 1] == container == "8000" and published == "8000"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    health = gateway["healthcheck"]["test"]
    assert health[health.index("--port") + 1] == container


def test_memd_metrics_port_is_published_and_listened_on(compose):
    memd = compose["services"]["memd"]
    (mapping,) = memd["ports"]
    bind, published, container = interpolate(mapping).split(":")
    assert bind == "127.0.0.1", "loopback unless MOEINF_BIND opens it"
    assert interpolate(mapping, {"MOEINF_MEMD_METRICS_PORT": "9100"}) == "127.0.0.1:9100:9464"
    command = [interpolate(a) for a in memd["command"]]
    assert command[command.index("--metrics-port") + 1] == container == published == "9464"
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0"


def test_the_api_key_reaches_the_gateway_only(compose):
    services = compose["services"]
    assert services["gateway"]["environment"]["MOEINF_API_KEY"] == "${MOEINF_API_KEY:-}"
    assert all("MOEINF_API_KEY" not in services[name].get("environment", {}) for name in ("memd", "worker"))


# ---------------------------------------------------------------- commands exist, with those flags
def test_every_command_parses_into_a_valid_config(compose):
    parser = build_parser()
    state_dirs, models = set(), set()
    env = image_env()  # what the services see in the container, besides their flags
    assert env["MOEINF_STATE_DIR"] == "/state"
    for where, argv in commands(compose):
        assert argv[0] == "moeinf", where
        args = parser.parse_args(argv[1:])  # SystemExit on an unknown subcommand or flag
        spelled = set(subparser(parser, argv[1])._option_string_actions)
        assert {a for a in argv if a.startswith("--")} <= spelled, f"{where}: flags spelled in full, no prefixes"
        cfg = build_config(CONFIGS[argv[1]], args, env=env)  # ValueError on a bad value
        state_dirs.add(str(cfg.state_dir))
        if hasattr(cfg, "model"):
            models.add(str(cfg.model))
    assert state_dirs == {"/state"} and models == {"/model"}, "one state directory and one model path for all"


def subparser(parser, name: str):
    (choices,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return choices[name]


def test_the_console_script_is_moeinf():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["moeinf"] == "services.cli:main"


def test_the_images_default_command_parses():
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile(), re.M).group(1)
    argv = yaml.safe_load(cmd)
    assert argv[0] == "moeinf"
    build_parser().parse_args(argv[1:])


# ---------------------------------------------------------------- GPU override
def test_gpu_override_reserves_one_gpu_for_memd_and_worker(gpu):
    services = gpu["services"]
    devices = {}
    for name in ("memd", "worker"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        devices[name] = device["device_ids"]
    assert devices["memd"] == devices["worker"] and len(devices["memd"]) == 1, "CUDA IPC needs the same device"
    assert "deploy" not in services["gateway"]
    assert services["worker"]["pid"] == "service:memd" and services["worker"]["ipc"] == "service:memd"
    assert services["memd"]["ipc"] == "shareable"


def test_gpu_override_puts_the_pool_and_the_worker_on_the_gpu(gpu):
    """By default the pool is in GPU memory and the worker computes there; the two knobs parse as their services'."""
    from common.config import MemdConfig, WorkerConfig

    memd_env = {k: interpolate(str(v)) for k, v in gpu["services"]["memd"]["environment"].items()}
    worker_env = {k: interpolate(str(v)) for k, v in gpu["services"]["worker"]["environment"].items()}
    assert memd_env["MOEINF_POOL_BACKEND"] == "cuda" and worker_env["MOEINF_DEVICE"] == "cuda"
    assert MemdConfig(model=ROOT, pool_backend=memd_env["MOEINF_POOL_BACKEND"],
                      cpu_experts=memd_env["MOEINF_CPU_EXPERTS"]).cpu_experts == "off"  # opt-in: it changes numerics
    assert WorkerConfig(model=ROOT, device=worker_env["MOEINF_DEVICE"]).device == "cuda"
    cpu = {k: interpolate(str(v), {"MOEINF_POOL_BACKEND": "shm", "MOEINF_WORKER_DEVICE": "cpu"})
           for k, v in {**gpu["services"]["memd"]["environment"], **gpu["services"]["worker"]["environment"]}.items()}
    assert (cpu["MOEINF_POOL_BACKEND"], cpu["MOEINF_DEVICE"]) == ("shm", "cpu")


def test_gpu_override_builds_a_cuda_image_with_the_dockerfiles_args(gpu):
    args = dockerfile_args()
    images = {s["image"] for s in gpu["services"].values()}
    assert len(images) == 1 and images != {s["image"] for s in load("compose.yaml")["services"].values()}
    for service in gpu["services"].values():
        build = service["build"]
        assert build["context"] == "." and set(build["args"]) <= set(args)
        assert interpolate(build["args"]["TORCH_INDEX"]).startswith("https://download.pytorch.org/whl/cu")
        assert build["args"]["EXTRAS"] == "[cuda]"
    assert "cuda" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


# ---------------------------------------------------------------- the image
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def image_env() -> dict:
    """The Dockerfile's ENV instructions (``ENV A=1 \\`` continued over several lines)."""
    text = dockerfile().replace("\\\n", " ")
    return dict(pair.split("=", 1) for line in re.findall(r"^ENV (.+)$", text, re.M) for pair in line.split())


def dockerfile_args() -> dict:
    return {name: value.strip('"') for name, value in re.findall(r"^ARG (\w+)=(.*)$", dockerfile(), re.M)}


def test_build_context_holds_every_copy_source():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for line in re.findall(r"^COPY (.+)$", dockerfile(), re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = " ".join(re.findall(r"^COPY (.+)$", dockerfile(), re.M))
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, f"package {package} is not copied into the image"
    assert project["project"]["readme"] in copied


def test_dockerfile_installs_what_the_readme_documents():
    args = dockerfile_args()
    steps = []
    for run in re.findall(r"^RUN (pip install .+)$", dockerfile(), re.M):
        argv = [interpolate(a, args) for a in shlex.split(run) if a != "--no-cache-dir"]
        steps.append(" ".join(argv))
    assert steps == ["pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", "pip install ."]
    readme = {line.strip() for line in (ROOT / "README.md").read_text().splitlines()}
    for step in steps:
        assert step in readme, f"the README does not document the image's step {step!r}"
    torch_pin = re.search(r"^TORCH \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH"] == torch_pin, "the image and `make install` pin the same torch"
