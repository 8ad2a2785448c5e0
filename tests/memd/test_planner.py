"""The prefetch planner: ordering, budget, dedupe, cancellation (the reader's priorities: tests/memd/test_reader.py).
Also: the predictor's lookahead scoring and the core's prefetch path (a prefetch never takes what an acquire needs;
an on-demand load that finds every slot busy takes one from a prefetch)."""

import numpy as np
import pytest

from common import messages as m
from services.memd.core import ExpertCache, CacheSettings
from services.memd.planner import PrefetchPlanner
from services.memd.predictor import Target

E = 8
MB = 1 << 20


def target(distance, layer, need: dict, step=1) -> Target:
    vec = np.zeros(E)
    for e, p in need.items():
        vec[e] = p
    return Target(distance, step, layer, vec)


def planner(window=4, threshold=0.3, budget=None) -> PrefetchPlanner:
    return PrefetchPlanner(MB, window, threshold, budget)


def test_priority_is_need_times_nearness_and_below_threshold_is_ignored():
    p = planner()
    cands = p.candidates([target(1, 2, {0: 0.5, 1: 0.2}), target(2, 3, {4: 0.9, 5: 0.6}),
                          target(4, 1, {6: 1.0})])
    # nearness 1 - (d - 1) / (window + 1): 1, 0.8, 0.6, 0.4
    assert [c.key for c in cands] == [(3, 4), (2, 0), (3, 5), (1, 6)]
    assert [round(c.priority, 3) for c in cands] == [0.72, 0.5, 0.48, 0.4]
    assert (2, 1) not in {c.key for c in cands}  # 0.2 < threshold


def test_an_expert_in_several_targets_keeps_its_best_priority():
    cands = planner(window=8).candidates([target(1, 0, {3: 0.4}), target(5, 0, {3: 1.0}, step=2)])
    assert len(cands) == 1 and cands[0].priority == pytest.approx(1 - 4 / 9) and cands[0].distance == 5


def test_dedupe_resident_and_inflight_experts_are_not_loaded_twice_but_protected():
    p = planner()
    cands = p.candidates([target(1, 0, {0: 1.0, 1: 0.9, 2: 0.8})])
    p.issued("w", cands[1])  # (0, 1) is already loading as a prefetch
    chosen, protect = p.plan("w", cands, present=lambda k: k in {(0, 0), (0, 1)}, bandwidth=None, layer_seconds=None)
    assert [c.key for c in chosen] == [(0, 2)]
    assert protect == {(0, 0): 1.0, (0, 1): pytest.approx(0.9)}


def test_budget_is_bandwidth_times_time_per_layer_times_window():
    p = planner(window=4)
    cands = p.candidates([target(d, d, {e: 1.0 for e in range(E)}) for d in range(1, 5)])
    # 100 MB/s and 10 ms per layer: 1 MB per layer of lookahead, 4 MB for the window
    chosen, _ = p.plan("w", cands, lambda k: False, bandwidth=100 * MB, layer_seconds=0.01)
    assert len(chosen) == 4
    # each admitted prefetch can start before its own layer runs: at most d MB queued ahead of distance d
    assert [c.distance for c in chosen] == [1, 2, 3, 4]
    # prefetches already in flight use the budget up
    for c in chosen[:3]:
        p.issued("w", c)
    more, _ = p.plan("w", cands, lambda k: False, bandwidth=100 * MB, layer_seconds=0.01)
    assert len(more) == 1
    # before anything is measured: one expert per layer of the window; an explicit budget wins
    assert len(planner(window=3).plan("w", cands, lambda k: False, None, None)[0]) == 3
    assert len(planner(budget=6 * MB).plan("w", cands, lambda k: False, None, None)[0]) == 6


def test_stale_prefetches_are_those_whose_layer_passed_unused_unless_replanned():
    p = planner()
    for c in p.candidates([target(1, 1, {0: 1.0, 1: 1.0}), target(2, 2, {5: 1.0}), target(3, 0, {7: 1.0}, step=2)]):
        p.issued("w", c)
    p.issued("other", p.candidates([target(1, 1, {2: 1.0})])[0])
    # worker w is now at step 1 layer 1 and used (1, 0): (1, 1) was predicted for this layer and not used
    assert p.stale("w", 1, 1, acquired={(1, 0)}) == [(1, 1)]
    p.done((1, 0))  # the acquire used it: it is an on-demand load now
    # at layer 2 (1, 1) is still stale, (2, 5) was used; the next step's layer 0 is still ahead
    assert sorted(p.stale("w", 1, 2, acquired={(2, 5)})) == [(1, 1)]
    # a new plan that wants (1, 1) for the next step keeps it
    p.retarget("w", p.candidates([target(3, 1, {1: 1.0}, step=2)]))
    assert p.stale("w", 1, 2, acquired=set()) == [(2, 5)]
    assert (1, 2) not in p.stale("w", 9, 9, acquired=set())  # another worker's prefetch is its own business


def acquire(layer, experts, step, requests=("r",), prefill=False, tokens=None):
    counts = tokens if tokens is not None else [[1] * len(experts) for _ in requests]
    return m.AcquireRequest(layer, list(experts), list(requests), counts, step, [prefill] * len(requests))


def run_steps(knobs: CacheSettings, steps: int, slots: int = 4) -> ExpertCache:
    """A request routing every token to experts 0 and 1 of each of 4 layers, with 4 slots: the pool cannot hold
    a step's 8 experts, so without prefetch every access after the first step misses."""
    core = ExpertCache(slots, 4, E, top_k=2, expert_bytes=MB, knobs=knobs)
    core.request_start("r")
    for step in range(1, steps + 1):
        for layer in range(4):
            req = acquire(layer, [0, 1], step, tokens=[[1, 1]])
            keys = [(layer, 0), (layer, 1)]
            for key in keys:
                core.table.pin(key)
            plan = core.acquire("w", req, now=step + layer / 10)
            for key in [k for k, _ in plan.loads] + plan.already_loading:
                core.load_done(key, MB, 0.01)
            pf = core.plan_prefetch("w", req, bandwidth=100 * MB)
            for key, _, _ in pf.start:  # reads complete while the layer computes
                core.load_done(key, MB, 0.01)
            for key in keys:
                core.table.unpin(key)
        core.step_trace(m.step_trace(1, step, ["r"], [1], [False], [
            m.LayerTrace(layer, [0, 1], [[1, 1]], [[0.5, 0.5]]) for layer in range(4)]))
    return core


def test_core_prefetches_predicted_experts_and_counts_their_use():
    plain = run_steps(CacheSettings(policy="lru", prefetch=False), steps=5)
    assert plain.table.counters.misses == 5 * 8  # LRU on a cyclic pattern larger than the pool: all misses
    # with prefetch (reads complete within a layer here), the next layers' experts are there when needed
    core = run_steps(CacheSettings(policy="lru", prefetch=True, window=2), steps=5)
    mt = core.metrics
    assert core.table.counters.misses == 8  # the first step's: nothing is known about the request yet
    # every access of steps 2..5 was prefetched; the last step also prefetched the next (unrun) step's layer 0
    assert sum(mt.prefetch_used) == 4 * 8 and sum(mt.prefetch_issued) == 4 * 8 + len(core.unused)
    assert sum(mt.prefetch_wasted) == 0
    (d1, s1), (d2, s2) = core.predictor.lookahead_stats()
    assert (d1, d2) == (1, 2) and s1.routed > 0 and s1.correct == s1.predicted  # every prediction was right
    assert s1.correct / s1.routed > 0.8 and s2.correct / s2.routed > 0.8
    # the activation policy with prefetch also beats plain LRU on this cyclic pattern
    act = run_steps(CacheSettings(policy="activation", prefetch=True, window=2), steps=5)
    assert act.table.counters.misses < plain.table.counters.misses


def test_prefetch_waits_for_a_slot_and_an_on_demand_load_steals_one():
    core = ExpertCache(3, 4, E, top_k=2, expert_bytes=MB, knobs=CacheSettings(policy="lru", window=2, threshold=0.1))
    core.planner.budget_bytes = 8 * MB
    # a speculated guess for layer 1 makes memd prefetch into the free slots
    req = m.AcquireRequest(0, [0], ["r"], [[1]], 1, [False], speculated=[3, 4], speculated_tokens=[1, 1])
    core.table.pin((0, 0))
    plan = core.acquire("w", req, now=0.0)
    assert plan.loads == [((0, 0), plan.loads[0][1])]
    pf = core.plan_prefetch("w", req, bandwidth=None)
    assert sorted(k for k, _, _ in pf.start) == [(1, 3), (1, 4)]  # no free slot is left
    # the next acquire needs two other experts of layer 1: (0, 0) is pinned and the rest are loading prefetches
    core.load_done((0, 0), MB, 0.01)
    core.table.pin((1, 5))
    plan = core.acquire("w", m.AcquireRequest(1, [5], ["r"], [[1]], 1, [False]), now=0.1)
    assert plan.no_slot == [(1, 5)] and not plan.loads
    victim = core.steal_candidate()
    assert victim in {(1, 3), (1, 4)}
    core.load_cancelled(victim)  # what the reader reports once the cancelled read stopped
    slot = core.reserve_demand((1, 5), transient=False)
    assert core.table.owner[slot] == (1, 5) and core.metrics.prefetch_cancelled == 1
    assert sum(core.metrics.prefetch_wasted) == 1


def test_a_prefetch_in_a_retired_slot_is_never_stolen():
    """After a shrink, cancelling a prefetch loading into a retired slot frees no live slot for a demand load."""
    core = ExpertCache(3, 4, E, top_k=2, expert_bytes=MB, knobs=CacheSettings(policy="lru", window=2, threshold=0.1))
    core.planner.budget_bytes = 8 * MB
    req = m.AcquireRequest(0, [0], ["r"], [[1]], 1, [False], speculated=[3, 4], speculated_tokens=[1, 1])
    core.table.pin((0, 0))
    core.acquire("w", req, now=0.0)
    pf = core.plan_prefetch("w", req, bandwidth=None)
    (high, _, _), (low, _, _) = sorted(pf.start, key=lambda s: -s[2])
    retired = max(pf.start, key=lambda s: s[1])[0]
    core.table.shrink(core.table.slot_of[retired])  # the prefetch in the highest slot now loads into a retired one
    assert core.steal_candidate() == next(k for k, _, _ in pf.start if k != retired)
