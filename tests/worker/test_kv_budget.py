"""``--kv-cache-memory``: a request's KV cache weighed on the cache itself, and the budget in bytes."""
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from services.worker import kv_budget
from services.worker.kv_budget import KvMeter, budget_bytes, cache_bytes
from services.worker.kv_cache import growing_cache

CONFIG = AutoConfig.for_model("mixtral", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              hidden_size=64)  # keys and values of 2 heads x 16: 128 bytes a token a layer in bf16


def grow(cache, tokens: int) -> None:
    for layer in range(3):
        cache.update(torch.zeros(1, 2, tokens, 16, dtype=torch.bfloat16),
                     torch.zeros(1, 2, tokens, 16, dtype=torch.bfloat16), layer)


def test_a_cache_weighs_what_its_tokens_hold_not_its_spare_room():
    cache = growing_cache(CONFIG, limit=1000)
    grow(cache, 5)
    assert cache_bytes(cache) == 3 * 5 * 128  # (its buffers hold 128 tokens of room)
    grow(cache, 1)
    assert cache_bytes(cache) == 3 * 6 * 128
    state = SimpleNamespace(cache=cache, conv=torch.zeros(1000, dtype=torch.float32))  # a fixed state beside it
    assert cache_bytes(state) == 3 * 6 * 128 + 4000


def seq(cache, prompt: int, max_tokens: int):
    return SimpleNamespace(cache=cache, cached=0, kv_bytes=0, kv_at=0, kv_tokens=prompt + max_tokens)


def test_the_meter_learns_a_tokens_growth_and_a_requests_fixed_state():
    meter, cache = KvMeter(), SimpleNamespace(kv=growing_cache(CONFIG, 1000), state=torch.zeros(250))
    a = seq(cache, 10, 90)
    grow(cache.kv, 10)
    a.cached = 10
    meter.observe(a)
    assert meter.growth is None and meter.reserve(a) is None  # one weighing: a fixed state or tokens?
    grow(cache.kv, 1)
    a.cached = 11
    meter.observe(a)
    assert meter.growth == 3 * 128 and meter.fixed == 1000  # the 250 floats
    assert meter.reserve(a) == 11 * 384 + 1000 + 89 * 384  # what it holds + its tokens to come
    waiting = seq(None, 20, 20)
    assert meter.reserve(waiting) == 40 * 384 + 1000


def test_the_budget_in_bytes(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    assert budget_bytes("64MiB", cpu) == (64 << 20, "64MiB")
    monkeypatch.setattr(kv_budget, "available_bytes", lambda device: 1 << 30)
    assert budget_bytes("50%", cpu)[0] == 1 << 29
    assert budget_bytes("auto", cpu) == (int(0.8 * (1 << 30)), "auto: 80% of the 1.0 GiB available")


def test_available_memory_is_bounded_by_the_cgroup_less_what_it_can_reclaim(monkeypatch, tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("536870912\n")
    (tmp_path / "memory.stat").write_text("anon 1\ninactive_file 268435456\n")
    monkeypatch.setattr(kv_budget, "CGROUP", tmp_path)
    monkeypatch.setattr(kv_budget, "_meminfo_available", lambda: 5 << 30)  # (the host's moves between two reads)
    assert kv_budget.available_bytes(torch.device("cpu")) == 768 << 20
    monkeypatch.setattr(kv_budget, "_meminfo_available", lambda: 512 << 20)  # the host's when it is the lower
    assert kv_budget.available_bytes(torch.device("cpu")) == 512 << 20
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the host's MemAvailable
    assert kv_budget.available_bytes(torch.device("cpu")) == 512 << 20


def test_a_bad_size_names_the_knob():
    from common.config import WorkerConfig, build_config

    with pytest.raises(ValueError, match="--kv-cache-memory 'lots' is not a size"):
        build_config(WorkerConfig, env={}, model="/m", kv_cache_memory="lots")


def test_a_worker_weighs_its_caches_and_runs_a_request_above_the_budget_alone(tmp_path):
    """The real worker: requests are weighed after each step (nothing fails to weigh); a request whose bound is
    above --kv-cache-memory still runs, alone (a waiting head above the budget once hung the worker)."""
    from helpers import Stack, write_family

    from common.worker_client import WorkerClient

    from worker.test_batching import Mux

    model = write_family("mixtral", tmp_path / "mixtral")
    with Stack(model, tmp_path / "state", expert_memory="100%", extra_worker=["--kv-cache-memory", "64KiB"]) as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            assert len(client.generate([1, 5, 9], 6)[0]) == 6  # weighed: a token's cost is known from here
        finally:
            client.close()
        mux = Mux(stack.worker_addr)
        try:  # ~150 KiB at its bound: it runs, alone (within 512); the small one sent beside it waits its turn
            big, small = mux.submit("big", [1, 5, 9], 300), mux.submit("small", [2, 3], 4)
            mux.run({big, small})
        finally:
            mux.close()
        assert len(mux.tokens(big)[0]) == 300 and len(mux.tokens(small)[0]) == 4
        order = [request for request, _ in mux.events]
        big_done = max(i for i, request in enumerate(order) if request == big)
        assert order.index(small) > big_done, "the small request ran beside one whose bound is above the budget"
        log = stack.worker_log.read_text()
        assert "KV cache budget (--kv-cache-memory): 64.0 KiB" in log and "could not be weighed" not in log


def test_nothing_available_means_one_request_at_a_time_not_no_bound(monkeypatch):
    monkeypatch.setattr(kv_budget, "available_bytes", lambda device: 0)
    assert budget_bytes("auto", torch.device("cpu"))[0] == 1 and budget_bytes("10%", torch.device("cpu"))[0] == 1
