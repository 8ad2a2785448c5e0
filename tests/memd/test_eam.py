"""EAMs: the worker attributes each layer's routing to the requests of a step exactly, and memd accumulates it
per request over prefill and decode (several requests in one step), bounded, once per step."""
import numpy as np
import pytest
import torch

from common import messages as m
from services.memd.core import ExpertCache, CacheSettings
from services.memd.eam import EamTable
from services.worker import experts


def test_worker_attribution_splits_a_batched_step_by_request():
    # three requests in one step: A has 2 tokens, B 1, C 3 (token_owner in flattened order)
    owner = [0, 0, 1, 2, 2, 2]
    top_k_index = torch.tensor([[1, 4], [4, 6], [1, 2], [6, 1], [6, 4], [2, 6]])
    top_k_weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    unique = torch.unique(top_k_index)
    by_torch = experts.attribution(top_k_index, top_k_weights, unique, 8, ["A", "B", "C"], torch.tensor(owner))
    small = experts.Routing.small(top_k_index.tolist(), top_k_weights.tolist(), ["A", "B", "C"], owner)
    assert unique.tolist() == small.experts == [1, 2, 4, 6]
    for requests, tokens, weights in (by_torch, (small.requests, small.tokens, small.weights)):
        assert requests == ["A", "B", "C"]
        assert tokens == [[1, 0, 2, 1],  # A: expert 1 once, 4 twice, 6 once
                          [1, 1, 0, 0],  # B
                          [1, 1, 1, 3]]  # C
        assert np.allclose(weights, [[0.75, 0, 0.75, 0.5], [0.9, 0.1, 0, 0], [0.4, 0.2, 0.3, 2.1]])
        assert sum(map(sum, tokens)) == top_k_index.numel()  # every routed token is attributed once


def test_worker_attribution_without_a_step_attributes_nothing():
    # the owner covers 2 tokens but the layer routed 3: no guessing
    got = experts.attribution(torch.tensor([[0, 1]] * 3), torch.ones(3, 2), torch.tensor([0, 1]), 4, ["A"],
                              torch.tensor([0, 0]))
    assert got == ([], [], [])
    small = experts.Routing.small([[0, 1]] * 3, [[1.0, 1.0]] * 3, ["A"], [0, 0])
    assert small.experts == [0, 1] and (small.requests, small.tokens, small.weights) == ([], [], [])


def step(number, requests, tokens, prefill, layers, worker=7):
    return m.step_trace(worker, number, requests, tokens, prefill,
                            [m.LayerTrace(layer, ex, counts, [[0.0] * len(ex) for _ in counts])
                             for layer, ex, counts in layers])


def test_eams_accumulate_prefill_and_decode_per_request_in_shared_steps():
    core = ExpertCache(8, 3, 4, top_k=2, expert_bytes=100, knobs=CacheSettings(policy="lru"))
    core.request_start("A")
    # step 1: A's prompt (3 tokens) alone
    core.step_trace(step(1, ["A"], [3], [True], [(0, [0, 1, 3], [[2, 3, 1]]), (1, [2, 3], [[3, 3]]),
                                                   (2, [0, 1], [[4, 2]])]))
    # step 2: A decodes while B's prompt (2 tokens) runs in the same step
    core.step_trace(step(2, ["A", "B"], [1, 2], [False, True], [
        (0, [1, 2], [[1, 1], [2, 2]]), (1, [0, 3], [[1, 1], [2, 2]]), (2, [1, 2], [[1, 1], [2, 2]])]))
    # step 3: both decode (the experts of a layer come in any order)
    core.step_trace(step(3, ["A", "B"], [1, 1], [False, False], [
        (0, [1, 2], [[1, 1], [1, 1]]), (1, [3, 0], [[1, 1], [1, 1]]), (2, [2, 1], [[1, 1], [1, 1]])]))
    a, b = core.eams.get("A"), core.eams.get("B")
    assert a.prefill.tolist() == [[2, 3, 0, 1], [0, 0, 3, 3], [4, 2, 0, 0]]
    assert a.decode.tolist() == [[0, 2, 2, 0], [2, 0, 0, 2], [0, 2, 2, 0]]
    assert b.prefill.tolist() == [[0, 2, 2, 0], [2, 0, 0, 2], [0, 2, 2, 0]]
    assert b.decode.tolist() == [[0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]]
    assert (a.prompt_tokens, a.decode_tokens, b.prompt_tokens, b.decode_tokens) == (3, 2, 2, 1)
    # each token is routed to top_k=2 experts in every layer
    assert (a.total.sum(1) == 2 * 5).all() and (b.total.sum(1) == 2 * 3).all()
    assert core.metrics.tokens == 3 + 3 + 2 and core.metrics.decode_tokens == 1 + 2
    # a step trace delivered twice counts once
    core.step_trace(step(3, ["A", "B"], [1, 1], [False, False], [(0, [1, 2], [[1, 1], [1, 1]])]))
    assert core.eams.get("A").decode_tokens == 2 and core.eams.get("A").decode[0].tolist() == [0, 2, 2, 0]
    # A finishes: its whole EAM (prefill + decode) goes to the EAMC, B stays live
    core.request_end("A")
    assert core.eams.get("A") is None and len(core.eamc) == 1
    expected = a.total / a.total.sum(1, keepdims=True)
    assert np.allclose(core.eamc.prob[0], expected)


def test_step_gaps_count_lost_traces_and_bad_traces_are_ignored(caplog):
    core = ExpertCache(8, 2, 4, top_k=2, expert_bytes=100, knobs=CacheSettings(policy="lru"))
    core.step_trace(step(1, ["A"], [1], [True], [(0, [0], [[2]])]))
    core.step_trace(step(4, ["A"], [1], [False], [(0, [0], [[2]])]))  # steps 2 and 3 were dropped
    assert core.metrics.trace_lost == 2 and core.metrics.trace_steps == 2
    core.step_trace(step(5, ["A"], [1], [False], [(9, [0], [[2]])]))  # layer out of range
    core.step_trace(step(6, ["A"], [1, 1], [False], [(0, [0], [[2]])]))  # 1 request, 2 token counts
    core.step_trace(step(7, ["A"], [1], [False], [(0, [0, 1], [[2]])]))  # a row shorter than the experts
    assert core.bad_traces == 3 and core.metrics.trace_steps == 2
    assert "ignored a step trace" in caplog.text
    assert core.eams.get("A").decode.tolist() == [[2, 0, 0, 0], [0, 0, 0, 0]]


def test_eam_table_is_bounded_and_names_its_knob(caplog):
    table = EamTable(2, 4, capacity=3)
    for r in "ABCD":
        table.start(r)
    assert len(table) == 3 and table.get("A") is None and table.dropped == 1
    assert "--max-traced-requests" in caplog.text
    table.start("B")  # touching B makes C the oldest
    table.start("E")
    assert table.get("C") is None and table.get("B") is not None


@pytest.mark.parametrize("count", [0, 1])
def test_request_without_routing_adds_nothing_to_the_eamc(count):
    core = ExpertCache(8, 2, 4, top_k=2, expert_bytes=100)
    core.request_start("A")
    if count:
        core.request_end("never-started")
    core.request_end("A")
    assert len(core.eamc) == 0


def test_a_detached_workers_unfinished_requests_are_dropped():
    """A killed worker sends no REQUEST_END: its requests' EAMs stayed until the table's bound pushed them out (with
    a warning blaming --max-traced-requests). They go when the worker detaches; another worker's stay."""
    table = EamTable(2, 4, capacity=8)
    entry = [(0, np.array([1]), np.array([1.0]))]
    table.add_step((7, 1), "a", 1, False, entry)
    table.add_step((7, 1), "b", 1, False, entry)
    table.add_step((8, 1), "c", 1, False, entry)
    table.start("d")  # started, never traced: nobody's (the bound handles it)
    assert table.forget_worker(7) == 2 and sorted(table.live) == ["c", "d"]
    assert table.forget_worker(7) == 0 and table.get("c").decode[0, 1] == 1.0
