"""kill -9 of the worker under real ``moeinf serve``: every stream in flight ends with an error event within 2 s
and closes, its admission slot is free at once (503 while the worker is down, never 429), and once the supervisor
has restarted the worker the next request succeeds."""
import http.client
import json
import os
import signal
import threading
import time

import pytest
from serving import Served

M = "demo"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from common.demo_model import DemoSize, write_demo_model

    model = write_demo_model(tmp_path_factory.mktemp("demo") / "demo", DemoSize(
        layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, dtype="float32"))
    s = Served(model, tmp_path_factory.mktemp("kill") / "state", max_queued=2)
    yield s
    s.close()


class Stream:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": M, "prompt": [1, 5, 9], "max_tokens": 3000, "stream": True}
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        self.events, self.closed_at = [], None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.resp:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                self.events.append(data.decode() if data == b"[DONE]" else json.loads(data))
        self.closed_at = time.monotonic()


def request(port: int, path: str, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.getheader("Retry-After"), resp.read()


def test_kill_9_of_the_worker_mid_stream(served):
    streams = [Stream(served.port) for _ in range(2)]  # --max-queued 2: every slot
    deadline = time.monotonic() + 60
    while not all(len(s.events) >= 2 for s in streams):
        assert time.monotonic() < deadline, "the streams never started"
        time.sleep(0.05)
    os.kill(served.worker_info().pid, signal.SIGKILL)
    killed = time.monotonic()
    for stream in streams:
        stream.thread.join(10)
        assert stream.closed_at is not None, "the stream never closed"
        assert stream.closed_at - killed < 2.0, f"closed {stream.closed_at - killed:.2f}s after the kill"
        last = stream.events[-1]
        assert last != "[DONE]" and last["error"]["type"] == "service_unavailable_error", stream.events[-2:]
    status, retry_after, body = request(served.port, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 503 and int(retry_after) >= 1, body  # the dead streams' slots are free: no 429
    assert request(served.port, "/health")[0] == 503
    served.wait_health(200, timeout=180)  # the supervisor restarts the worker
    status, _, body = request(served.port, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 2
