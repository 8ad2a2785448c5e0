"""Tracing in the worker: per-step buffering and flushing, positions and phases, the next-gate guess; and, through
real processes, ``--record-trace`` writing exactly transformers' routing, memd learning from the step traces, and
the EAMC surviving a memd restart."""
import json
import time

import pytest
import torch
from helpers import Stack

from common.protocol import Op
from common.traces import TraceHeader, TraceWriter, group_steps, read_trace
from common.worker_client import WorkerClient
from services.worker import experts, next_gate
from services.worker.tracing import StepRecorder, StepState


class FakeClient:
    def __init__(self):
        self.events = []

    def emit(self, op, event):
        self.events.append((op, event))


def layer(rec: StepRecorder, index: int, top_k_index, owner, num_requests, num_experts=4):
    ids = torch.tensor(top_k_index)
    unique = torch.unique(ids)
    requests, tokens, weights = experts.attribution(ids, torch.full(ids.shape, 0.5), unique, num_experts,
                                                    [f"r{i}" for i in range(num_requests)], torch.tensor(owner))
    rec.layer(index, unique.tolist(), tokens, weights, [], ids, torch.full(ids.shape, 0.5))


def test_steps_are_buffered_then_flushed_with_positions_and_phases(tmp_path):
    client = FakeClient()
    writer = TraceWriter(tmp_path / "t.jsonl", TraceHeader("tiny", 2, 4, 2))
    rec = StepRecorder(client, writer)
    # step 1: r0's prompt of 3 tokens
    rec.begin(["r0"], torch.tensor([0, 0, 0]))
    layer(rec, 0, [[0, 1], [1, 2], [0, 3]], [0, 0, 0], 1)
    layer(rec, 1, [[2, 3], [2, 3], [0, 1]], [0, 0, 0], 1)
    assert client.events == []  # nothing leaves during the step
    # step 2: r0 decodes while r1's 2-token prompt runs (the engine did not say phases or positions)
    rec.begin(["r0", "r1"], torch.tensor([0, 1, 1]))
    (op, first), = client.events
    assert op is Op.STEP_TRACE and first.step == 1 and first.requests == ["r0"] and first.tokens == [3]
    assert first.prefill == [True] and first.layers == [0, 1] and first.layout_problem() is None
    assert first.expert_counts[0] == 4 and first.routed[:4] == [2, 2, 1, 1]  # flat on the wire
    traced = first.layer_traces()
    assert traced[0].experts == [0, 1, 2, 3] and traced[0].tokens == [[2, 2, 1, 1]]
    assert traced[0].weights == [[1.0, 1.0, 0.5, 0.5]]
    layer(rec, 0, [[0, 1], [2, 3], [1, 2]], [0, 1, 1], 2)
    layer(rec, 1, [[0, 2], [1, 3], [1, 3]], [0, 1, 1], 2)
    # r0 ends: its last step is flushed before the end event
    StepState(rec).request_ended("r0", 2)
    assert [op for op, _ in client.events] == [Op.STEP_TRACE, Op.STEP_TRACE, Op.REQUEST_END]
    second = client.events[1][1]
    assert second.tokens == [1, 2] and second.prefill == [False, True]
    traced = second.layer_traces()
    assert traced[1].experts == [0, 1, 2, 3] and traced[1].tokens == [[1, 0, 1, 0], [0, 2, 0, 2]]
    # step 3: r1 decodes; explicit phases and positions win
    rec.begin(["r1"], torch.tensor([0]), positions=[7], phases=["decode"])
    layer(rec, 0, [[3, 1]], [0], 1)
    rec.close()
    assert client.events[-1][1].step == 3
    _, records = read_trace(tmp_path / "t.jsonl")
    lines = [(r.req, r.pos, r.layer, r.phase) for r in records]
    assert lines == [("r0", 0, 0, "prefill"), ("r0", 1, 0, "prefill"), ("r0", 2, 0, "prefill"),
                     ("r0", 0, 1, "prefill"), ("r0", 1, 1, "prefill"), ("r0", 2, 1, "prefill"),
                     ("r0", 3, 0, "decode"), ("r1", 0, 0, "prefill"), ("r1", 1, 0, "prefill"),
                     ("r0", 3, 1, "decode"), ("r1", 0, 1, "prefill"), ("r1", 1, 1, "prefill"),
                     ("r1", 7, 0, "decode")]
    assert "r0" not in rec.seen and rec.seen["r1"] == 3


def test_a_failing_trace_file_stops_recording_not_serving(tmp_path):
    """--record-trace on a disk that fills up: the write's OSError ends the file, the step traces still go to memd
    and nothing is raised into the compute loop."""
    class FullDisk(TraceWriter):
        def flush(self):
            raise OSError(28, "No space left on device")

    client = FakeClient()
    rec = StepRecorder(client, FullDisk(tmp_path / "t.jsonl", TraceHeader("tiny", 2, 4, 2)))
    rec.begin(["r0"], torch.tensor([0, 0]))
    layer(rec, 0, [[0, 1], [1, 2]], [0, 0], 1)
    rec.begin(["r0"], torch.tensor([0]))  # ends step 1: its write fails
    assert rec.writer is None and [op for op, _ in client.events] == [Op.STEP_TRACE]
    layer(rec, 0, [[2, 3]], [0], 1)
    rec.close()
    assert [op for op, _ in client.events] == [Op.STEP_TRACE, Op.STEP_TRACE]


def test_a_step_without_attribution_or_that_failed_sends_only_its_number():
    """memd counts a gap in a worker's step numbers as a lost trace: a step with nothing to say, or whose forward
    failed (its requests run again, traced then), says so with an empty trace of its number."""
    client = FakeClient()
    rec = StepRecorder(client)
    rec.begin(["r0"], torch.tensor([0, 0]))
    rec.layer(0, [1], [], [], [], torch.tensor([[1, 2]]), torch.ones(1, 2))  # no per-request counts
    rec.end_step()
    first = rec.begin(["r0"], torch.tensor([0]))
    layer(rec, 0, [[1, 2]], [0], 1)
    rec.abort()
    assert [(op, ev.requests, ev.layers) for op, ev in client.events] == [(Op.STEP_TRACE, [], [])] * 2
    assert client.events[1][1].step == first.number == client.events[0][1].step + 1
    assert all(ev.layout_problem() is None for _, ev in client.events)  # (memd would ignore a malformed one)


def test_next_gate_guess_is_the_next_routers_top_k():
    torch.manual_seed(0)
    router = torch.nn.Module()
    router.weight = torch.nn.Parameter(torch.randn(6, 16))
    router.top_k = 2
    block = torch.nn.Module()
    block.gate = router
    gate = next_gate.find_router(block, num_experts=6, top_k=3)
    assert gate is not None and gate.top_k == 2 and gate.bias is None
    hidden = torch.randn(5, 16)
    guessed, counts = gate.guess(hidden, 6)
    top = torch.topk(hidden @ router.weight.T, 2).indices
    assert guessed == sorted(set(top.flatten().tolist()))
    assert counts == [int((top == e).sum()) for e in guessed] and sum(counts) == 10


@pytest.fixture(scope="module")
def recorded(mixtral, tmp_path_factory):
    """Two requests through memd + a worker recording its trace; memd's stats before and after a restart."""
    root = tmp_path_factory.mktemp("trace")
    path = root / "trace.jsonl"
    prompts = [[1, 5, 9, 22, 7], list(range(2, 40, 3))]
    with Stack(mixtral, root / "state", extra_worker=["--record-trace", str(path)]) as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            outputs = [client.generate(p, 10, request=f"req-{i}")[0] for i, p in enumerate(prompts)]
        finally:
            client.close()
        deadline = time.monotonic() + 10
        while (stats := stack.memd_stats()).eamc_size < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the last step trace and request end travel on the trace socket, after the reply
    with Stack(mixtral, root / "state") as stack:  # memd restarts with the EAMC it saved
        warm = stack.memd_stats()
    return path, prompts, outputs, stats, warm


def test_recorded_trace_is_transformers_routing(recorded, mixtral):
    from transformers import AutoModelForCausalLM

    path, prompts, outputs, _, _ = recorded
    header, records = read_trace(path)
    records = list(records)
    assert json.loads(path.read_text().splitlines()[0]) == {
        "format": "moeinf-trace/1", "model": mixtral.name, "num_layers": 4, "num_experts": 8, "top_k": 2}
    steps = list(group_steps(records))
    assert len(steps) == 2 * 10  # each request: its prompt, then 9 decode steps (the 10th token is not run)
    model = AutoModelForCausalLM.from_pretrained(mixtral)
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        mine = [r for r in records if r.req == f"req-{i}"]
        assert len(mine) == (len(prompt) + 9) * header.num_layers
        assert {(r.pos, r.layer) for r in mine} == {(p, l) for p in range(len(prompt) + 9) for l in range(4)}
        assert all(r.phase == ("prefill" if r.pos < len(prompt) else "decode") for r in mine)
        # the routing of every token is what plain transformers computes for the same sequence
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out[:9]]), output_router_logits=True).router_logits
        for r in mine:
            want = torch.topk(torch.softmax(logits[r.layer][r.pos].float(), -1), 2)
            assert r.experts == want.indices.tolist(), (r.pos, r.layer)
            assert r.weights == pytest.approx((want.values / want.values.sum()).tolist(), abs=1e-4)


def test_memd_learns_from_the_step_traces(recorded):
    _, prompts, _, stats, warm = recorded
    assert stats.policy == "activation" and stats.prefetch
    assert stats.trace_steps == 20 and stats.trace_lost == 0
    assert stats.tokens == sum(len(p) + 9 for p in prompts)
    assert stats.eamc_size == 2 and stats.eamc_capacity == 256  # both finished requests were collected
    assert [s.distance for s in stats.lookahead] == [1, 2, 3, 4]
    assert all(s.routed > 0 and 0 < s.correct <= min(s.predicted, s.routed) for s in stats.lookahead)
    one = stats.lookahead[0]  # one layer ahead: better than chance (top-2 of 8 experts: 0.25)
    assert one.correct / one.predicted > 2 / 8, one
    (gate,) = stats.next_gate  # the worker's guess was scored too (it is made for layers 1..3 of every step)
    assert gate.distance == 1 and gate.routed > 0 and 0 < gate.correct <= min(gate.predicted, gate.routed)
    assert stats.prefetch_issued >= stats.prefetch_used + stats.prefetch_wasted and stats.prefetch_used > 0
    used = stats.prefetch_used
    assert stats.prefetch_precision == pytest.approx(used / max(1, used + stats.prefetch_wasted))
    assert stats.prefetch_recall == pytest.approx(used / max(1, used + stats.misses))
    assert stats.prefetch_late <= stats.prefetch_used and stats.prefetch_cancelled <= stats.prefetch_wasted
    assert sum(s.hits for s in stats.layers) == stats.hits and sum(s.misses for s in stats.layers) == stats.misses
    assert sum(s.prefetch_issued for s in stats.layers) == stats.prefetch_issued
    assert sum(s.bytes_read for s in stats.layers) == stats.bytes_read
    assert stats.read_bandwidth > 0 and stats.layer_seconds > 0
    # a restarted memd starts warm: the EAMC was saved at exit and reloaded
    assert warm.eamc_size == 2 and warm.trace_steps == 0


def test_recorded_trace_keeps_every_guess(recorded):
    """With --record-trace the worker guesses every layer ahead its knob allows at any confidence and writes them
    all (memd still gets only those it asked for), once per step and layer: ``guesses``, the top-2 per layer ahead
    (a prompt step's: the union of its tokens'), and ``speculated``, the next layer's of them."""
    path, _, _, _, _ = recorded
    header, records = read_trace(path)
    for step in group_steps(records):
        for layer, lines in step.layers.items():
            first, rest = lines[0], lines[1:]
            assert first.guesses is not None and all(r.guesses is None and r.speculated is None for r in rest)
            ahead = header.num_layers - 1 - layer
            assert {d for d, _, _ in first.guesses} == set(range(1, ahead + 1)), (first.pos, layer)
            assert all(0 < c <= 1 for _, _, c in first.guesses)
            per_distance = [sum(d == k for d, _, _ in first.guesses) for k in range(1, ahead + 1)]
            assert all(n == 2 if first.phase == "decode" else 2 <= n <= header.num_experts for n in per_distance)
            assert first.speculated == sorted(e for d, e, _ in first.guesses if d == 1)
            assert step.routing(layer).guesses == sorted(first.guesses)
