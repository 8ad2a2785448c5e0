"""Exact per-request expert attribution under batching, checked on what the worker tells memd for every layer.

The worker's engine runs in this process against a real memd. Each layer note's ``(layer, experts, requests,
tokens)`` is recorded (the note carries the attribution; an acquire only asks for slots);
summing ``tokens`` per request gives its expert activation matrix (EAM: MoE layers x
experts, tokens routed). Two interleaved requests must each get the EAM they get alone, and every MoE layer of a
step must acquire the union of the step's experts exactly once.
"""
import numpy as np
import pytest
import torch
from helpers import spawn, stop, wait_for_log

from common import messages as m
from common.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.main import attach
from services.worker.scheduler import Limits, Scheduler

A = m.GenerateRequest("A", [(5 * j) % 300 + 2 for j in range(37)], 12)  # 3 chunks of 16: prefill beside B's decode
B = m.GenerateRequest("B", [9, 4, 11, 3], 20)


@pytest.fixture(scope="module")
def worker(mixtral, tmp_path_factory, kernel_cache):
    state = tmp_path_factory.mktemp("attr") / "state"
    state.mkdir(parents=True)
    log = state / "memd.log"
    memd = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state), "--expert-memory", "50%"], log)
    try:
        wait_for_log(memd, log, "memd ready")
        threads = torch.get_num_threads()
        model, client, hello, steps, _ = attach(WorkerConfig(model=mixtral, state_dir=state, threads=1,
                                                                 kernel_cache_dir=kernel_cache))
        try:
            engine = Engine(model, 512, steps)
            engine.enable_batching()
            yield engine, client, hello.num_layers
        finally:
            client.close()
            torch.set_num_threads(threads)
    finally:
        stop(memd)


class Recorder:
    def __init__(self, client, monkeypatch):
        self.calls = []
        note = client.note

        def recording(step, layer, experts, requests, tokens, *args):
            self.calls.append((layer, list(experts), list(requests), [list(t) for t in tokens]))
            return note(step, layer, experts, requests, tokens, *args)

        monkeypatch.setattr(client, "note", recording)

    def eams(self, num_layers: int, num_experts: int = 8) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for layer, experts, requests, tokens in self.calls:
            for request, row in zip(requests, tokens):
                eam = out.setdefault(request, np.zeros((num_layers, num_experts), dtype=np.int64))
                eam[layer, experts] += row
        return out


def drive(engine: Engine, joins: dict[int, list[m.GenerateRequest]]) -> tuple[dict[str, list[int]], list[int]]:
    """Run requests through the scheduler and engine; ``joins[n]`` join before step n. Returns the outputs and
    the number of requests in each step."""
    scheduler = Scheduler(Limits(max_running=8, max_step_tokens=64, max_prefill_chunk=16, max_waiting=8))
    seqs, sizes, n = {}, [], 0
    while scheduler or any(k >= n for k in joins):
        for req in joins.get(n, []):
            seqs[req.request] = engine.start(req)
            scheduler.add(seqs[req.request])
        step = scheduler.schedule()
        if step:
            engine.run(step)
            sizes.append(len(step))
            for chunk in step:
                if chunk.seq.finish_reason is not None:
                    scheduler.remove(chunk.seq)
        n += 1
    return {r: s.generated for r, s in seqs.items()}, sizes


def test_interleaved_requests_get_their_solo_eams(worker, monkeypatch):
    engine, client, num_layers = worker
    solo_rec = Recorder(client, monkeypatch)
    solo_out = {**drive(engine, {0: [A]})[0], **drive(engine, {0: [B]})[0]}
    solo = solo_rec.eams(num_layers)

    together_rec = Recorder(client, monkeypatch)
    out, sizes = drive(engine, {0: [B], 2: [A]})  # A's prompt chunks run in B's decode steps
    together = together_rec.eams(num_layers)

    assert out == solo_out
    assert max(sizes) == 2, "the requests never shared a step"
    for request, prompt, n in (("A", A.prompt, A.max_tokens), ("B", B.prompt, B.max_tokens)):
        np.testing.assert_array_equal(together[request], solo[request], err_msg=f"{request}'s EAM changed")
        # every token of the request, prompt and generated (the last one is never fed back), in every MoE layer
        assert (together[request].sum(axis=1) == (len(prompt) + n - 1) * 2).all()


def test_each_moe_layer_notes_the_union_of_the_step_once(worker, monkeypatch):
    engine, client, num_layers = worker
    rec = Recorder(client, monkeypatch)
    _, sizes = drive(engine, {0: [B], 1: [A]})
    assert len(rec.calls) == num_layers * len(sizes), "a layer was noted more than once in a step"
    shared = 0
    for i, (layer, experts, requests, tokens) in enumerate(rec.calls):
        assert layer == i % num_layers and len(requests) == sizes[i // num_layers]
        assert experts == sorted(set(experts))
        assert all(sum(col) > 0 for col in zip(*tokens)), "a noted expert no request routed to"
        shared += len(requests) == 2
    assert shared > 0
