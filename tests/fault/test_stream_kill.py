"""kill -9 under real ``moeinf serve``.

- Of the worker: every stream in flight ends with an error event within 2 s and closes, its admission slot is free
  at once (503 while the worker is down, never 429), and once the supervisor has restarted the worker the next
  request succeeds.
- Of memd: the same for its streams (the worker notices by its pid), and serve restarts memd and the worker.
- Of the gateway: its client's connection breaks at once (nothing else is possible; it never hangs), the worker
  stops generating for the dead gateway, the supervisor restarts the gateway and the next request succeeds;
  memd and the worker live on, no shared memory leaks and the EAMC is intact.
"""
import http.client
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from helpers import moeinf_cmd, orphan_regions, shm_regions
from serving import Served, SseStream

from services.memd.pool import pool_name

pytestmark = pytest.mark.serial  # kills memd: its pool region is orphaned until the restart

M = "demo"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from common.demo_model import DemoSize, write_demo_model

    model = write_demo_model(tmp_path_factory.mktemp("demo") / "demo", DemoSize(
        layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, dtype="float32"))
    s = Served(model, tmp_path_factory.mktemp("kill") / "state", max_queued=2)
    yield s
    s.close()


def request(port: int, path: str, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.getheader("Retry-After"), resp.read()


def started_streams(served) -> list[SseStream]:
    """Two long streams (--max-queued 2: every slot), each past its first events."""
    streams = [SseStream(served.port, M, 3000, prompt=[1, 5, 9], timeout=60) for _ in range(2)]
    deadline = time.monotonic() + 60
    while not all(len(s.events) >= 2 for s in streams):
        assert time.monotonic() < deadline, "the streams never started"
        time.sleep(0.05)
    return streams


def assert_ended_with_an_error_event(streams: list[SseStream], killed: float) -> None:
    for stream in streams:
        stream.thread.join(10)
        assert stream.closed_at is not None, "the stream never closed"
        assert stream.closed_at - killed < 2.0, f"closed {stream.closed_at - killed:.2f}s after the kill"
        last = stream.events[-1]
        assert last != "[DONE]" and last["error"]["type"] == "service_unavailable_error", stream.events[-2:]


def test_kill_9_of_the_worker_mid_stream(served):
    streams = started_streams(served)
    os.kill(served.worker_info().pid, signal.SIGKILL)
    assert_ended_with_an_error_event(streams, time.monotonic())
    status, retry_after, body = request(served.port, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 503 and int(retry_after) >= 1, body  # the dead streams' slots are free: no 429
    assert request(served.port, "/health")[0] == 503
    served.wait_health(200, timeout=180)  # the supervisor restarts the worker
    status, _, body = request(served.port, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 2


def children(served) -> dict[str, psutil.Process]:
    return {p.cmdline()[3]: p for p in psutil.Process(served.proc.pid).children() if len(p.cmdline()) > 3}


def admin_stats(served) -> dict:
    out = subprocess.run(moeinf_cmd("admin", "--state-dir", str(served.state_dir), "--json", "stats"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["stats"]


def test_kill_9_of_the_gateway_mid_stream(served):
    served.wait_health(200, timeout=180)
    assert request(served.port, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2})[0] == 200
    eamc_before = admin_stats(served)["eamc_size"]
    assert eamc_before >= 1
    before = children(served)
    stream = SseStream(served.port, M, 3000, prompt=[1, 5, 9], timeout=60)  # 3000 tokens: it runs until the kill
    deadline = time.monotonic() + 60
    while len(stream.events) < 2:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.05)
    os.kill(before["gateway"].pid, signal.SIGKILL)
    killed = time.monotonic()
    stream.thread.join(10)
    assert stream.closed_at is not None, "the client of the killed gateway hangs"
    assert stream.closed_at - killed < 2.0, f"the client saw the break {stream.closed_at - killed:.2f}s after the kill"
    # cut short: no [DONE] and no error event (the dead gateway could send neither); http.client ends the read
    # quietly, stricter clients (httpx, hence the OpenAI client) raise on the unterminated chunked body
    assert stream.events[-1] != "[DONE]" and "error" not in stream.events[-1], stream.events[-2:]
    deadline = time.monotonic() + 10
    while served.worker_info().active:  # the worker cancels what the dead gateway had asked for
        assert time.monotonic() < deadline, "the worker still generates for the killed gateway"
        time.sleep(0.1)
    served.wait_health(200, timeout=180)  # the supervisor restarts the gateway
    after = children(served)
    assert after["gateway"].pid != before["gateway"].pid
    assert (after["worker"].pid, after["memd"].pid) == (before["worker"].pid, before["memd"].pid)
    status, _, body = request(served.port, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 2
    ours = {pool_name(served.state_dir, "pool"), pool_name(served.state_dir, "control")}
    assert ours <= shm_regions() and not (ours & orphan_regions())
    assert not list(served.state_dir.glob("eamc.bin.corrupt-*"))
    assert admin_stats(served)["eamc_size"] >= eamc_before


def test_kill_9_of_memd_mid_stream(served):
    """Of memd: the worker notices by memd's pid (at its next acquire, or within 0.2 s when every expert it needs
    is leased), fails the step as unavailable, and every stream ends with an error event within 2 s; serve restarts
    memd (and the worker, whose pool went with it), and the next request succeeds."""
    served.wait_health(200, timeout=180)
    before = children(served)
    streams = started_streams(served)
    os.kill(before["memd"].pid, signal.SIGKILL)
    assert_ended_with_an_error_event(streams, time.monotonic())
    served.wait_health(200, timeout=180)
    after = children(served)
    assert after["memd"].pid != before["memd"].pid and after["worker"].pid != before["worker"].pid
    status, _, body = request(served.port, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 200, body
    ours = {pool_name(served.state_dir, "pool"), pool_name(served.state_dir, "control")}
    assert ours <= shm_regions() and not (ours & orphan_regions())
