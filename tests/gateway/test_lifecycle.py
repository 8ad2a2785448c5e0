"""Disconnects cancel generation; a full queue answers 429; /health follows the worker through a restart."""
import http.client
import json
import os
import re
import signal
import threading
import time
import urllib.request

import pytest
from conftest import Served

M = "demo"


@pytest.fixture(scope="module")
def small_queue(demo_model, tmp_path_factory):
    s = Served(demo_model, tmp_path_factory.mktemp("serve-q") / "state", max_queued=2)
    yield s
    s.close()


def open_stream(served, max_tokens=3000, wait_first=True, **extra):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    body = json.dumps({"model": M, "prompt": [1, 5, 9], "max_tokens": max_tokens, "stream": True, **extra})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    if wait_first:
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")
    return conn


def wait_active(served, n, timeout=30):
    deadline = time.monotonic() + timeout
    while served.worker_info().active < n:
        assert time.monotonic() < deadline, f"never {n} active requests"
        time.sleep(0.05)


def wait_idle(served, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = served.worker_info()
        if info.active == 0:
            return info
        time.sleep(0.1)
    raise TimeoutError("the worker kept working")


def _client_gone(served) -> float:
    """The gateway's count of completions whose client went away (status 499)."""
    with urllib.request.urlopen(f"{served.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = r'moeinf_gateway_requests_total\{endpoint="/v1/completions",status="499"\} (\S+)'
    return float(m.group(1)) if (m := re.search(pattern, text)) else 0.0


def test_disconnect_cancels_generation(small_queue):
    """A client that hangs up mid-stream: the gateway counts it gone (499) and the worker stops generating for it,
    long before the request's 3000 tokens (a request that ended on its own, an EOS or an error, is no cancel)."""
    before, gone = wait_idle(small_queue).generated_tokens, _client_gone(small_queue)
    conn = open_stream(small_queue)
    time.sleep(0.5)
    assert small_queue.worker_info().active == 1, "the request ended before the client left: nothing to cancel"
    conn.sock.shutdown(2)
    conn.close()
    info = wait_idle(small_queue)
    produced = info.generated_tokens - before
    assert produced < 3000, "the worker kept generating after the client left"
    assert _client_gone(small_queue) == gone + 1
    time.sleep(1.0)
    assert small_queue.worker_info().generated_tokens == info.generated_tokens


def test_queue_full_is_429_with_retry_after(small_queue):
    conns = [open_stream(small_queue, wait_first=False) for _ in range(2)]
    try:
        wait_active(small_queue, 2)
        conn = http.client.HTTPConnection("127.0.0.1", small_queue.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": M, "prompt": "x", "max_tokens": 2}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 429 and int(resp.getheader("Retry-After")) >= 1
        assert payload["error"]["type"] == "rate_limit_error"
    finally:
        for c in conns:
            c.close()
    wait_idle(small_queue)


def test_many_clients_interleave(small_queue):
    """Two streams at once are decoded together (continuous batching): each one's first token arrives before the
    other's last. A gateway or worker that served them one after the other would pass a check of their statuses."""
    stamps: dict[int, list[float]] = {}
    ends: dict[int, bytes] = {}  # (each stream's last event, for the message)

    def one(i: int):
        conn = open_stream(small_queue, max_tokens=40, wait_first=False, temperature=0)  # (the same tokens each run)
        resp = conn.getresponse()
        assert resp.status == 200
        lines = [(time.monotonic(), line) for line in resp if line.startswith(b"data: {")]
        stamps[i], ends[i] = [t for t, _ in lines], lines[-1][1][:300] if lines else b""
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = stamps[0], stamps[1]
    assert len(a) > 10 and len(b) > 10, (len(a), len(b), ends)  # (sampled, a stream once had 8 events with text)
    assert max(a[0], b[0]) < min(a[-1], b[-1]), "the second stream started only after the first had ended"


def test_health_follows_worker_restart(small_queue):
    assert small_queue.health() == 200
    os.kill(small_queue.worker_info().pid, signal.SIGKILL)
    small_queue.wait_health(503, timeout=30)
    small_queue.wait_health(200, timeout=120)
