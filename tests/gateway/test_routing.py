"""Several workers behind one gateway: discovery of worker-*.sock, least outstanding tokens, conversation affinity,
and a dead worker failing only its own requests. (Real processes: tests/fault/test_multi_worker.py.)"""
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fake import FakeWorker, LocalGateway, gateway_config
from test_worker_loss import SSE, post, wait

from common.config import state_socket
from services.gateway.routing import PREFIX_TOKENS, Router, Worker, affinity_key

M = "demo"


class CountingWorker(FakeWorker):
    def __init__(self, *args, **kw):
        self.generated: list[str] = []  # request ids it was sent
        super().__init__(*args, **kw)

    def _on(self, identity, op, rid, req):
        if op.name == "GENERATE":
            self.generated.append(req.request)
        super()._on(identity, op, rid, req)


def fake(addr: str) -> Worker:
    return Worker(addr, link=None, reason="")


# ---------------------------------------------------------------------------- the router alone
def test_least_outstanding_tokens_wins_and_counts_down_as_tokens_come():
    router, a, b = Router(entries=8, slack_tokens=0), fake("a"), fake("b")
    first = router.dispatch(router.pick([a, b], "k1"), 100)
    assert first.worker is a and (a.outstanding, b.outstanding) == (100, 0)
    second = router.dispatch(router.pick([a, b], "k2"), 10)
    assert second.worker is b
    first.progress(95)  # a: 5 left, b: 10
    assert router.pick([a, b], "k3") is a
    first.end()
    second.end()
    second.end()  # idempotent
    assert (a.outstanding, b.outstanding, a.in_flight, b.in_flight) == (0, 0, 0, 0)


def test_a_conversation_returns_to_its_worker_until_the_load_gap_passes_the_slack():
    router, a, b = Router(entries=8, slack_tokens=50), fake("a"), fake("b")
    assert router.pick([a, b], "user:alice") is a
    router.dispatch(a, 40)
    assert router.pick([a, b], "user:alice") is a  # 40 above b, within the slack
    router.dispatch(a, 20)
    assert router.pick([a, b], "user:alice") is b  # 60 above: it moves, and is remembered there
    assert router.pick([a, b], "user:alice") is b
    assert router.pick([a], "user:alice") is a  # its worker is not ready: any ready one


def test_affinity_is_bounded_by_its_knob():
    router, a = Router(entries=3, slack_tokens=0), fake("a")
    for i in range(10):
        router.pick([a], f"user:{i}")
    assert list(router.affinity) == ["user:7", "user:8", "user:9"]


def test_the_key_is_the_user_else_the_prompt_prefix():
    prompt = list(range(PREFIX_TOKENS))
    assert affinity_key("alice", prompt) == "user:alice" != affinity_key("bob", prompt)
    assert affinity_key(None, prompt) == affinity_key(None, prompt + [7, 8, 9])  # the next turn of the chat
    assert affinity_key(None, prompt) != affinity_key(None, [1] + prompt)


# ---------------------------------------------------------------------------- a gateway over two fake workers
@pytest.fixture
def two_workers(demo_model):
    from services.gateway.text import TextCodec

    codec = TextCodec(demo_model)
    tmp = tempfile.TemporaryDirectory(prefix="gw", dir="/tmp")  # short: ipc:// paths are at most 107 bytes
    state = Path(tmp.name)
    cfg = gateway_config(demo_model, state, max_queued=8, affinity_slack_tokens=0)
    vocab = len(codec.tokenizer)
    workers = [CountingWorker(cfg.worker_addr, vocab, step_s=0.05),
               CountingWorker(state_socket(state, "worker-b.sock"), vocab, step_s=0.05)]
    gateway = LocalGateway(cfg, codec)
    wait(lambda: len(gateway.gateway.workers.ready()) == 2, timeout=15)
    yield gateway, workers
    gateway.close()
    for worker in workers:
        worker.close()
    tmp.cleanup()


def test_concurrent_requests_spread_over_both_workers_and_a_user_sticks(two_workers):
    gateway, workers = two_workers
    streams = [SSE(gateway, max_tokens=40) for _ in range(4)]
    wait(lambda: all(len(s.events) >= 2 for s in streams))
    assert [len(w.generated) for w in workers] == [2, 2]  # least outstanding tokens: 2 and 2
    for s in streams:
        s.wait_closed(10)
    for _ in range(3):
        status, _, _ = post(gateway, {"model": M, "prompt": "Hi", "max_tokens": 2, "user": "alice"})
        assert status == 200
    counts = [len(w.generated) for w in workers]
    assert sorted(counts) == [2, 5], counts  # alice's three turns went to one worker (both idle: it stays)


def test_a_dead_worker_fails_only_its_requests_and_the_other_keeps_serving(two_workers):
    gateway, workers = two_workers
    streams = [SSE(gateway, max_tokens=4000) for _ in range(2)]
    wait(lambda: all(len(s.events) >= 2 for s in streams))
    assert [len(w.generated) for w in workers] == [1, 1]
    workers[1].close()
    ended = [s for s in streams if s.wait_closed(3) is not None]
    assert len(ended) == 1 and ended[0].events[-1]["error"]["type"] == "service_unavailable_error"
    survivor = next(s for s in streams if s is not ended[0])
    seen = len(survivor.events)
    time.sleep(0.3)
    assert survivor.closed_at is None and len(survivor.events) > seen  # still streaming from worker 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(gateway, {"model": M, "prompt": "x",
                                                                             "max_tokens": 2})[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200, 200, 200]
    assert gateway.gateway.health_reason == ""
    survivor.close()  # it would stream 4000 tokens: hang up so the gateway can stop


def test_a_vanished_worker_takes_its_metric_series_with_it(two_workers):
    import urllib.request

    def series() -> str:
        with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10) as resp:
            return "\n".join(line for line in resp.read().decode().splitlines()
                             if line.startswith("moeinf_gateway_worker_requests_total"))

    gateway, workers = two_workers
    streams = [SSE(gateway, max_tokens=40) for _ in range(2)]
    wait(lambda: all(len(s.events) >= 2 for s in streams))  # both running: one on each worker
    assert [len(w.generated) for w in workers] == [1, 1]
    for s in streams:
        s.wait_closed(10)
    assert 'worker="worker-b.sock"' in series() and 'worker="worker.sock"' in series()
    workers[1].close()
    Path(gateway.cfg.state_dir, "worker-b.sock").unlink()  # as a stopping worker removes its socket file
    wait(lambda: len(gateway.gateway.workers.workers) == 1, timeout=15)
    assert 'worker="worker-b.sock"' not in series() and 'worker="worker.sock"' in series()


def test_socket_files_nobody_listens_on_are_not_linked(demo_model):
    """A killed worker leaves its ``worker-<id>.sock`` behind (compose keeps the state volume): each was linked for
    good (a ZeroMQ context, a monitor and a health call every poll), so recreated workers piled them up. A file
    nobody listens on is not linked, and a linked worker that leaves its file abandoned is dropped."""
    import asyncio
    import socket

    from services.gateway.routing import WorkerSet

    tmp = tempfile.TemporaryDirectory(prefix="gw", dir="/tmp")  # short: ipc:// paths are at most 107 bytes
    state = Path(tmp.name)
    cfg = gateway_config(demo_model, state)
    for i in range(20):  # bound, then closed without unlinking: the file stays with nobody on it
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(state / f"worker-dead{i}.sock"))
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(state / "worker-live.sock"))
    live.listen()

    async def discover_twice():
        workers = WorkerSet(cfg)
        await workers.discover()
        first = sorted(w.name for w in workers.workers.values())
        live.close()  # killed: its file stays
        await workers.discover()
        second = sorted(w.name for w in workers.workers.values())
        for worker in workers.workers.values():
            await worker.link.close()
        return first, second
    try:
        assert asyncio.run(discover_twice()) == (["worker-live.sock", "worker.sock"], ["worker.sock"])
    finally:
        tmp.cleanup()
