"""Fault injection with real processes (issue 12): a slow disk never blocks the gateway; kill -9 of memd in the
middle of a request fails that request with an error, serve restarts memd (and the worker), the next request
succeeds, /dev/shm does not leak and the EAMC file survives; a pool whose slots are all pinned gives a clear error,
not a deadlock."""
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import Stack, moeinf_cmd, orphan_regions, shm_regions, write_family
from serving import SseStream, free_port

from common.worker_client import WorkerClient, WorkerClientError
from services.memd.pool import pool_name
from services.memd.testhooks import VARIABLE as READ_LATENCY
from services.worker.memd_client import MemdClient

pytestmark = pytest.mark.serial  # kills memd: its pool region is orphaned until the restart

READ_LATENCY_MS = 150  # every expert read of the served memd sleeps this long first (a slow disk)


class Served:
    def __init__(self, model: Path, state: Path):
        self.state, self.port = state, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = state.parent / "serve.log"
        self.proc = subprocess.Popen(
            moeinf_cmd("serve", "--model", str(model), "--state-dir", str(state), "--port", str(self.port),
                       "--expert-memory", "25%", "--max-queued", "8"),
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, READ_LATENCY: str(READ_LATENCY_MS)})
        self.wait_healthy(600)

    def get(self, path: str, timeout: float = 10) -> tuple[int, float]:
        start = time.monotonic()
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as resp:
                return resp.status, time.monotonic() - start
        except urllib.error.HTTPError as exc:
            return exc.code, time.monotonic() - start
        except OSError:
            return 0, time.monotonic() - start

    def complete(self, max_tokens: int, timeout: float = 120) -> tuple[int, dict]:
        body = json.dumps({"model": self.model_id(), "prompt": "the quick brown fox", "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{self.url}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def model_id(self) -> str:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=10) as resp:
            return json.load(resp)["data"][0]["id"]

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.get("/health", 2)[0] != 200:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, self.log.read_text(errors="replace")[-3000:]
            time.sleep(0.3)

    def child(self, name: str) -> psutil.Process:
        for p in psutil.Process(self.proc.pid).children():
            if p.cmdline()[3:4] == [name]:
                return p
        raise LookupError(name)

    def admin(self, *args) -> dict:
        out = subprocess.run(moeinf_cmd("admin", "--state-dir", str(self.state), "--json", *args), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from common.demo_model import DemoSize, write_demo_model

    root = tmp_path_factory.mktemp("fault")
    model = write_demo_model(root / "demo", DemoSize(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2,
                                                     dtype="float32"))
    s = Served(model, root / "state")
    yield s
    s.close()


def test_a_slow_disk_never_blocks_the_gateway(served):
    assert "TEST ONLY: every expert read sleeps" in served.log.read_text()
    served.admin("drop")  # every request must read its experts from the (slow) disk
    with cf.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(served.complete, 24) for _ in range(4)]
        health = []
        while not all(j.done() for j in jobs):
            health.append(served.get("/health"))
            time.sleep(0.1)
        results = [j.result() for j in jobs]
    assert all(status == 200 for status, _ in results), results
    assert len(health) >= 5, "the requests were not slowed down: is the hook installed?"
    assert all(status == 200 for status, _ in health)
    assert max(t for _, t in health) < 0.5, f"/health took up to {max(t for _, t in health):.2f}s"


def test_kill_9_of_memd_mid_request(served):
    state = served.state
    assert served.complete(4)[0] == 200  # a finished request: the EAMC has a member to keep
    saved = served.admin("eamc", "save", str(state / "eamc.bin"))
    assert saved["size"] >= 1
    memd, worker = served.child("memd"), served.child("worker")
    served.admin("drop")
    with cf.ThreadPoolExecutor(1) as pool:
        job = pool.submit(served.complete, 200)
        probe = WorkerClient(f"ipc://{state.resolve()}/worker.sock")
        try:
            deadline = time.monotonic() + 60
            while probe.info(timeout_s=10).active == 0:
                assert time.monotonic() < deadline and not job.done(), "the request never started"
                time.sleep(0.05)
        finally:
            probe.close()
        os.kill(memd.pid, signal.SIGKILL)
        status, body = job.result(timeout=60)
    assert status == 503 and body["error"]["type"] == "service_unavailable_error", (status, body)  # not a hang
    assert body["error"]["message"], body
    served.wait_healthy(300)  # serve restarted memd and the worker
    assert served.child("memd").pid != memd.pid and served.child("worker").pid != worker.pid
    assert served.complete(4)[0] == 200
    ours = {pool_name(state, "pool"), pool_name(state, "control")}
    assert ours <= shm_regions() and not (ours & orphan_regions())  # the new memd's regions, nothing leaked
    assert not list(state.glob("eamc.bin.corrupt-*"))
    assert served.admin("stats")["stats"]["eamc_size"] >= saved["size"]  # reloaded intact


def test_a_pool_whose_slots_are_all_pinned_is_an_error_not_a_deadlock(tmp_path):
    model = write_family("mixtral", tmp_path / "mixtral")  # 4 MoE layers x 8 experts; 25%: 8 slots
    with Stack(model, tmp_path / "state", expert_memory="25%") as stack:
        hog = MemdClient(stack.memd_addr, f"ipc://{stack.state_dir.resolve()}/memd-trace.sock", timeout_s=30)
        worker = WorkerClient(stack.worker_addr, timeout_s=60)
        try:
            hog.handshake(str(model.resolve()), 30, "--handshake-timeout-s")
            hog.ready()
            assert len(set(hog.acquire(0, list(range(8)), [], []))) == 8  # every slot pinned by another client
            start = time.monotonic()
            with pytest.raises(WorkerClientError) as err:
                worker.generate([1, 5, 9, 22, 7], 4)
            assert time.monotonic() - start < 30
            assert "--expert-memory" in str(err.value) or "pinned" in str(err.value), str(err.value)
            hog.release(0, list(range(8)))
            tokens, reason = worker.generate([1, 5, 9, 22, 7], 4)
            assert len(tokens) == 4 and reason == "length"
        finally:
            worker.close()
            hog.close()


def test_sigterm_with_8_streams_in_flight_stops_every_child_within_10s(served):
    """Runs last on the module's server: SIGTERM to serve while 8 streams run (every --max-queued slot); each ends
    with [DONE] or a final error event and its response closes (never a hang), and serve and its three children
    are gone in < 10 s (stopped in parallel)."""
    children = [served.child(name) for name in ("gateway", "worker", "memd")]
    streams = [SseStream(served.port, served.model_id(), max_tokens=200) for _ in range(8)]
    deadline = time.monotonic() + 120
    while not all(s.events for s in streams):  # every stream has sent its headers and a first chunk
        assert time.monotonic() < deadline, [len(s.events) for s in streams]
        time.sleep(0.05)
    start = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    served.proc.wait(15)
    took = time.monotonic() - start
    for stream in streams:
        stream.thread.join(15)
        assert stream.closed_at is not None, "a stream never closed"
        assert stream.events[-1] == "[DONE]" or stream.events[-1]["error"]["message"], stream.events[-2:]
    assert any(s.events[-1] != "[DONE]" for s in streams)  # 200 tokens each: some were still running
    assert took < 10, f"serve took {took:.1f}s to stop"
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert served.proc.returncode == 0
