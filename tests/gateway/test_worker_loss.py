"""A worker that dies or fails a step: streams end with an error event at once, slots are freed, /health is 503,
and the gateway serves again as soon as a worker answers. (The real kill -9 is tests/fault/test_stream_kill.py.)"""
import contextlib
import http.client
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fake import FakeWorker, LocalGateway, gateway_config
from serving import SseStream

M = "demo"


@pytest.fixture(scope="module")
def codec(demo_model):
    from services.gateway.text import TextCodec

    return TextCodec(demo_model)


@pytest.fixture
def setup(demo_model, codec):
    """``(gateway, start_worker)``: a gateway with --max-queued 2; ``start_worker(**kw)`` binds a fake worker."""
    tmp = tempfile.TemporaryDirectory(prefix="gw", dir="/tmp")  # short: ipc:// paths are at most 107 bytes
    cfg = gateway_config(demo_model, Path(tmp.name), max_queued=2)
    workers = []

    def start_worker(**kw) -> FakeWorker:
        workers.append(FakeWorker(cfg.worker_addr, len(codec.tokenizer), **kw))
        return workers[-1]

    gateway = LocalGateway(cfg, codec)
    yield gateway, start_worker
    gateway.close()
    for worker in workers:
        worker.close()
    tmp.cleanup()


@contextlib.contextmanager
def own_gateway(demo_model, codec, worker: dict, **knobs):
    """``(gateway, worker)``: a gateway with ``knobs`` before a fake worker with ``worker``'s settings, ready."""
    tmp = tempfile.TemporaryDirectory(prefix="gw", dir="/tmp")  # short: ipc:// paths are at most 107 bytes
    cfg = gateway_config(demo_model, Path(tmp.name), **knobs)
    fake = FakeWorker(cfg.worker_addr, len(codec.tokenizer), **worker)
    gateway = LocalGateway(cfg, codec)
    try:
        gateway.wait_ready()
        yield gateway, fake
    finally:
        gateway.close()
        fake.close()
        tmp.cleanup()


def SSE(gateway, max_tokens=4000) -> SseStream:  # noqa: N802 (reads as the stream it returns)
    """A streaming request read event by event (``events`` are decoded ``data:`` payloads, ``[DONE]`` as is)."""
    return SseStream(gateway.port, M, max_tokens, prompt="Hi", timeout=30)


def wait(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def post(gateway, body):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), json.loads(resp.read())


def test_worker_death_ends_streams_with_an_error_and_frees_their_slots(setup):
    gateway, start_worker = setup
    worker = start_worker(step_s=0.05)
    gateway.wait_ready()
    streams = [SSE(gateway), SSE(gateway)]  # --max-queued 2: every slot taken
    wait(lambda: all(len(s.events) >= 2 for s in streams))
    died = time.monotonic()
    worker.close()  # its socket closes as a killed process's does
    for stream in streams:
        closed = stream.wait_closed(5)
        assert closed is not None and closed - died < 2.0, "the stream did not end within 2 s"
        last = stream.events[-1]
        assert last != "[DONE]" and last["error"]["type"] == "service_unavailable_error", stream.events[-3:]
        assert set(last["error"]) == {"message", "type", "param", "code"}
    wait(lambda: gateway.gateway.active == 0, timeout=2)
    status, headers, payload = post(gateway, {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 503 and int(headers["Retry-After"]) >= 1, payload  # not 429: the slots are free
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 503
    start_worker()  # the supervisor's restart
    wait(lambda: post(gateway, {"model": M, "prompt": "x", "max_tokens": 2})[0] == 200, timeout=15)


def test_non_streaming_request_of_a_dying_worker_is_503_with_retry_after(setup):
    gateway, start_worker = setup
    worker = start_worker(step_s=0.05)
    gateway.wait_ready()
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(gateway, {"model": M, "prompt": "x",
                                                                              "max_tokens": 3000})))
    thread.start()
    wait(lambda: worker.live)
    time.sleep(0.2)
    died = time.monotonic()
    worker.close()
    thread.join(5)
    status, headers, payload = result["r"]
    assert time.monotonic() - died < 2.0
    assert status == 503 and int(headers["Retry-After"]) >= 1 and payload["error"]["code"] == "service_unavailable"


def test_failed_step_ends_the_stream_with_its_error(setup):
    gateway, start_worker = setup
    start_worker(step_s=0.02, fail_after=3)
    gateway.wait_ready()
    stream = SSE(gateway)
    assert stream.wait_closed(5) is not None
    texts = [e for e in stream.events if isinstance(e, dict) and "choices" in e]
    assert len(texts) >= 1 and stream.events[-1]["error"]["code"] == "internal", stream.events
    wait(lambda: gateway.gateway.active == 0, timeout=2)


def test_dead_worker_pid_is_noticed_without_a_disconnect(setup):
    """Across a pid namespace the socket may be all there is; here the pid alone must do."""
    gateway, start_worker = setup
    stand_in = subprocess.Popen(["sleep", "60"])  # the "worker process" the fake worker claims to be
    try:
        start_worker(step_s=0.05, pid=stand_in.pid)
        gateway.wait_ready()
        stream = SSE(gateway)
        wait(lambda: len(stream.events) >= 2)
        died = time.monotonic()
        stand_in.kill()
        stand_in.wait()
        closed = stream.wait_closed(5)
        assert closed is not None and closed - died < 2.0
        assert "died" in stream.events[-1]["error"]["message"]
    finally:
        stand_in.kill()


def test_stopping_gateway_ends_its_streams_with_an_error_and_cancels_them(setup):
    gateway, start_worker = setup
    worker = start_worker(step_s=0.05)
    gateway.wait_ready()
    stream = SSE(gateway)
    wait(lambda: len(stream.events) >= 2)
    gateway.loop.call_soon_threadsafe(gateway.gateway.abort_requests, "the server is shutting down")
    assert stream.wait_closed(5) is not None
    assert "shutting down" in stream.events[-1]["error"]["message"]
    wait(lambda: not worker.live, timeout=5)  # the worker was told to cancel: it generates nothing for nobody
    status, _, payload = post(gateway, {"model": M, "prompt": "x", "max_tokens": 2})
    assert status == 503, payload


def test_a_client_that_leaves_during_tokens_without_text_is_noticed(setup, codec):
    """Special tokens show no text, so the stream writes nothing after its first event and no write can fail: the
    closed connection alone must cancel the generation (the handler is cancelled when its connection is lost)."""
    gateway, start_worker = setup
    worker = start_worker(step_s=0.01, token=codec.tokenizer.bos_token_id)
    gateway.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": M, "prompt": "Hi", "max_tokens": 4000,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    wait(lambda: len(worker.live) == 1)
    conn.sock.shutdown(2)
    conn.close()
    wait(lambda: worker.cancelled and not worker.live, timeout=3)
    wait(lambda: gateway.gateway.active == 0, timeout=2)


def test_a_client_that_leaves_cancels_its_generation_at_once_without_the_garbage_collector(setup):
    """The worker's CANCEL is sent by the token generator's cleanup: it must run when the request ends, not when
    the collector happens to free the suspended generator (a cycle through the write error's traceback kept a
    worker generating for the rest of a test once)."""
    import gc

    gateway, start_worker = setup
    worker = start_worker(step_s=0.01)
    gateway.wait_ready()
    gc.disable()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": M, "prompt": "Hi", "max_tokens": 4000,
                                                            "stream": True}), {"Content-Type": "application/json"})
        wait(lambda: len(worker.live) == 1)
        time.sleep(0.2)
        conn.sock.shutdown(2)
        conn.close()
        wait(lambda: worker.cancelled and not worker.live, timeout=3)
    finally:
        gc.enable()


def test_a_silent_worker_fails_the_request_and_is_told_to_cancel_it(demo_model, codec):
    """No token for --step-timeout-s: the client gets a 503 naming the knob, and the worker (alive, its step stalled)
    is told to cancel the request, so it stops holding a slot for nobody."""
    with own_gateway(demo_model, codec, dict(step_s=0.05, silent_after=1), step_timeout_s=1.0) as (gateway, worker):
        start = time.monotonic()
        status, _, payload = post(gateway, {"model": M, "prompt": "x", "max_tokens": 5})
        assert status == 503 and "--step-timeout-s" in payload["error"]["message"], payload
        assert time.monotonic() - start < 10
        wait(lambda: len(worker.cancelled) == 1 and not worker.live, timeout=5)
        wait(lambda: gateway.gateway.active == 0, timeout=2)


def test_a_flood_of_health_checks_sends_the_worker_one_info_call_at_a_time(demo_model, codec):
    """/health needs no key: 40 at once must not take the worker link's room from generation calls. They join the
    refresh in flight, so the worker hears one WORKER_INFO per refresh, and every one of them answers 200."""
    with own_gateway(demo_model, codec, dict(info_s=0.3)) as (gateway, worker):
        before = worker.infos
        statuses = []

        def health():
            conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
            conn.request("GET", "/health")
            statuses.append(conn.getresponse().status)

        threads = [threading.Thread(target=health) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses == [200] * 40
        assert worker.infos - before <= 6, worker.infos - before  # a few refreshes (and the poller's), not 40


def test_a_request_waiting_its_turn_is_not_failed_while_the_worker_answers_others(demo_model, codec):
    """A worker running one request at a time: the second waits silent for longer than --step-timeout-s, but the
    worker streams the first all along, so the second is not failed as silent; it runs after, and both finish."""
    with own_gateway(demo_model, codec, dict(step_s=0.05, max_running=1), step_timeout_s=0.5) as (gateway, worker):
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(gateway, {"model": M, "prompt": "x",
                                                                                  "max_tokens": 30})))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(status for status, _, _ in results) == [200, 200], results
        assert all(payload["usage"]["completion_tokens"] == 30 for _, _, payload in results)
        assert not worker.cancelled


def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(demo_model, codec):
    """A streaming client that never reads (its buffers full) would hold its admission slot and the worker's
    generation for as long as its TCP connection lives: after --stream-write-timeout-s it is dropped as gone, its
    generation cancelled and its slot freed."""
    import socket

    knobs = dict(stream_write_timeout_s=1.0, max_tokens_limit=200_000)
    with own_gateway(demo_model, codec, dict(max_model_len=300_000), **knobs) as (gateway, worker), \
            contextlib.closing(socket.socket()) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", gateway.port))
        body = json.dumps({"model": M, "prompt": "Hi", "max_tokens": 200_000, "stream": True}).encode()
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert client.recv(12) == b"HTTP/1.1 200"  # then nothing more is read
        wait(lambda: worker.cancelled and not worker.live, timeout=60)
        wait(lambda: gateway.gateway.active == 0, timeout=5)
        assert len(worker.cancelled) == 1


def test_a_failure_during_a_long_prompts_prefill_is_an_http_error_not_a_started_stream(setup):
    """The worker says after each prompt chunk that the request is under way (a reply without tokens); the stream's
    headers still wait for the first token, so a step that fails during the prefill reaches a streaming client as
    an HTTP error it can retry on, not as a 200 with an error event."""
    gateway, start_worker = setup
    start_worker(step_s=0.02, prefill_chunks=3, fail_after=0)
    gateway.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": M, "prompt": "Hi", "max_tokens": 5, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 500 and body["error"]["code"] == "internal", (resp.status, body)


def test_replies_without_tokens_add_nothing_to_the_output(setup):
    gateway, start_worker = setup
    start_worker(step_s=0.01, prefill_chunks=4)
    gateway.wait_ready()
    status, _, payload = post(gateway, {"model": M, "prompt": "Hi", "max_tokens": 6})
    assert status == 200 and payload["usage"]["completion_tokens"] == 6, payload
    stream = SSE(gateway, max_tokens=6)
    stream.wait_closed(30)
    events = stream.events
    assert events[-1] == "[DONE]", events
    assert sum(1 for e in events[:-1] if e.get("choices") and e["choices"][0]["text"]) == 6, events
