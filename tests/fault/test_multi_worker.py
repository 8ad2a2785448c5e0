"""``moeinf serve --workers 2``: two real worker processes on one memd (one pool, at 50%: one MoE layer's experts
per worker), each computing tokens equal to transformers' while the other computes too; the gateway sends
requests to both; kill -9 of one fails only its own stream, the other keeps serving, and memd lets go of the dead
worker (and only it) until the supervisor's restart attaches again."""
import http.client
import json
import os
import signal
import threading
import time

import pytest
from serving import Served, SseStream

from common.worker_client import WorkerClient

M = "demo"
PROMPTS = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))]
NEW_TOKENS = 16
SOCKS = ("worker-0.sock", "worker-1.sock")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from common.demo_model import DemoSize, write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo", DemoSize(
        layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, dtype="float32"))


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    s = Served(model, tmp_path_factory.mktemp("multi") / "state", max_queued=8, expert_memory="50%", workers=2)
    yield s
    s.close()


def reference(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = None
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def generate_on(served, sock: str, out: dict) -> None:
    client = WorkerClient(f"ipc://{served.state_dir.resolve()}/{sock}", timeout_s=120)
    try:
        out[sock] = [client.generate(p, NEW_TOKENS)[0] for p in PROMPTS]
    finally:
        client.close()


def admin_workers(served) -> list[int]:
    from common import admin_messages as a
    from common.protocol import Op
    from services.admin_cli import AdminConfig, call

    return sorted(call(AdminConfig(state_dir=served.state_dir), Op.ADMIN_HEALTH, a.AdminHealthRequest("")).workers)


def metric(served, name: str) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("GET", "/metrics")
    values = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            values[labels[len(name):]] = float(value)
    return values


def post(port: int, prompt) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"model": M, "prompt": prompt, "max_tokens": 4}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.slow
def test_two_workers_on_one_memd_compute_exact_tokens_at_once(served, model):
    pids = [served.worker_info(sock).pid for sock in SOCKS]
    assert len(set(pids)) == 2 and admin_workers(served) == sorted(pids)  # both attached to the one memd
    got: dict = {}
    threads = [threading.Thread(target=generate_on, args=(served, sock, got)) for sock in SOCKS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    expected = reference(model)
    assert got[SOCKS[0]] == expected and got[SOCKS[1]] == expected


@pytest.mark.slow
def test_the_gateway_uses_both_and_a_killed_worker_fails_only_its_stream(served):
    before = metric(served, "moeinf_gateway_worker_requests_total")
    streams = [SseStream(served.port, M, 3000, prompt=[1, 5, 9]), SseStream(served.port, M, 3000, prompt=[2, 7, 4, 4])]
    wait(lambda: all(len(s.events) >= 2 for s in streams), 120, "the streams did not start")
    after = metric(served, "moeinf_gateway_worker_requests_total")
    sent = {k: after[k] - before.get(k, 0) for k in after}
    assert sent == {'{worker="worker-0.sock"}': 1, '{worker="worker-1.sock"}': 1}, sent  # least outstanding
    victim = served.worker_info(SOCKS[1]).pid
    survivor = served.worker_info(SOCKS[0]).pid
    os.kill(victim, signal.SIGKILL)
    wait(lambda: any(s.closed_at for s in streams), 10, "no stream ended after the kill")
    ended = [s for s in streams if s.closed_at]
    assert len(ended) == 1 and ended[0].events[-1]["error"]["type"] == "service_unavailable_error"
    alive = next(s for s in streams if not s.closed_at)
    seen = len(alive.events)
    assert [post(served.port, [4, 4, i]) for i in range(3)] == [200, 200, 200]  # worker 0 serves meanwhile
    assert len(alive.events) > seen and alive.closed_at is None
    wait(lambda: admin_workers(served) == [survivor] or victim not in admin_workers(served), 10,
         "memd kept the dead worker")
    assert survivor in admin_workers(served)
    wait(lambda: len(admin_workers(served)) == 2, 180, "the supervisor's restart did not attach again")
    alive.conn.close()
