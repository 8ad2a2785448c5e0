"""On a workload with the structure the paper describes (requests from a few topics whose experts co-activate,
skewed reuse within a request), the activation policy with prefetch misses less than LRU at the same pool size
(25% of the experts), and stalls less. Replayed through memd's own decisions (services/memd/simulate.py, leases
on): one expert read takes two layers of compute. The margins asserted are below those measured (docs/traces.md):

| workload                    | LRU miss/token | activation+prefetch | measured ratio (stall)  | asserted (stall) |
|-----------------------------|----------------|---------------------|-------------------------|------------------|
| 24 requests, one at a time  | 1.908          | 1.655               | 0.87 (0.87)             | <= 0.92 (0.92)   |
| 32 requests, four at a time | 3.895          | 2.632               | 0.68 (0.68)             | <= 0.74 (0.75)   |
| demo model's trace, 50%     | 0.432          | 0.353               | 0.82                    | <= 0.86          |

(The demo row was 0.75 when the simulator fed memd through acquires and revoked every other lease under
pressure; with layer notes and memd's shortfall revocation it is 0.82.)
(The cyclic-distance policy of issue 11 prefetches only near-certain experts; the earlier policy prefetched every
likely one and got 0.79 and 0.54 here, at the price of losing to LRU on flat, Mixtral-like routing.)
"""
from pathlib import Path

import pytest

from common.traces import group_steps, read_trace
from services.bench.synthetic import Workload, generate
from services.memd.core import CacheSettings
from services.memd.simulate import SimConfig, simulate

DATA = Path(__file__).parent.parent / "data"
LRU = CacheSettings(policy="lru", prefetch=False)
ACTIVATION = CacheSettings(policy="activation", prefetch=True)


@pytest.mark.parametrize("requests, batch, misses_ratio, stall_ratio", [(24, 1, 0.92, 0.92), (32, 4, 0.74, 0.75)],
                         ids=["one-at-a-time", "four-at-a-time"])
def test_activation_with_prefetch_misses_less_than_lru(requests, batch, misses_ratio, stall_ratio):
    header, records = generate(Workload(requests=requests, batch=batch, seed=0))
    steps = list(group_steps(records))
    slots = header.num_layers * header.num_experts // 4  # 25% of the experts
    lru = simulate(header, steps, SimConfig(slots, LRU))
    act = simulate(header, steps, SimConfig(slots, ACTIVATION))
    assert lru.tokens == act.tokens > 1000
    assert act.misses_per_token <= misses_ratio * lru.misses_per_token, (act.misses_per_token, lru.misses_per_token)
    assert act.stall_seconds <= stall_ratio * lru.stall_seconds
    # the prediction is measured against what was then routed, at every lookahead distance
    assert [d for d, _, _ in act.lookahead] == [1, 2, 3, 4]
    assert all(precision > 0.5 and recall > 0.7 for _, precision, recall in act.lookahead)
    assert act.prefetch_used >= act.prefetch_wasted  # it prefetches only near-certain experts (often none at all)


def test_on_the_demo_models_trace_too():
    """A trace recorded from the demo model (random weights: little structure to learn) with --record-trace."""
    header, records = read_trace(DATA / "demo-trace.jsonl")
    steps = list(group_steps(records))
    slots = header.num_layers * header.num_experts // 2  # 50%; at 25% (one layer's worth) the two are even
    lru = simulate(header, steps, SimConfig(slots, LRU))
    act = simulate(header, steps, SimConfig(slots, ACTIVATION))
    assert act.misses_per_token <= 0.86 * lru.misses_per_token
