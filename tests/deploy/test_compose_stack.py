"""compose.yaml's commands and healthchecks, run as plain processes in the order compose starts them.

No Docker engine runs here, so the containers are replaced by processes. ``/model`` and ``/state`` are mapped onto
temporary paths, the gateway's port onto a free one, and the image's ENV is applied. Every other argument is the
one compose passes.
"""
import json
import os
import subprocess
import time
import urllib.request

import pytest
from helpers import free_ports, moeinf_cmd, spawn, stop
from test_compose import image_env, interpolate, load

M = "demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from common.demo_model import DemoSize, write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo", DemoSize(layers=4, hidden=64, intermediate=128,
                                                                                heads=4, kv_heads=2, dtype="float32"))


def test_compose_commands_and_healthchecks_run_the_stack(demo, tmp_path):
    state, (port, metrics_port) = tmp_path / "state", map(str, free_ports(2))
    mapping = {"/model": str(demo), "/state": str(state), "8000": port, "9464": metrics_port}
    env = {**image_env(), "MOEINF_STATE_DIR": str(state), "MOEINF_DEMO_DIR": str(tmp_path / "unused")}

    def argv(args: list[str]) -> list[str]:
        args = [mapping.get(interpolate(a), interpolate(a)) for a in args]
        assert args[0] == "moeinf"
        return args[1:]

    def healthy(service: dict) -> bool:
        test = argv(service["healthcheck"]["test"][1:])
        return subprocess.run(moeinf_cmd(*test), env={**os.environ, **env}, capture_output=True).returncode == 0

    services = load("compose.yaml")["services"]
    assert not healthy(services["memd"]), "nothing runs yet: the healthcheck must fail"
    procs = []
    try:
        for name in ("memd", "worker", "gateway"):  # the order depends_on: service_healthy imposes
            procs.append(spawn(argv(services[name]["command"]), tmp_path / f"{name}.log", env=env))
            deadline = time.monotonic() + 180
            while not healthy(services[name]):
                assert procs[-1].poll() is None, (tmp_path / f"{name}.log").read_text()
                assert time.monotonic() < deadline, f"{name} never became healthy"
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        body = json.dumps({"model": M, "prompt": [1, 5, 9], "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] >= 1
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            assert "moeinf_gateway_requests_total" in resp.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert "moeinf_memd_up 1.0" in resp.read().decode()  # memd's own endpoint, as compose publishes it
    finally:
        codes = [stop(p) for p in reversed(procs)]  # gateway, worker, memd: compose's stop order
    assert codes == [0] * len(procs), codes
