"""seq2seq.Lockstep and Seq2Seq.decode_together: several decoder forwards in threads, meeting at each MoE layer where
one runs the layer for all; a failure anywhere fails every forward of the step and none waits forever."""
import threading
from types import SimpleNamespace

import pytest
import torch

from services.worker.lockstep import Lockstep, PeerFailed, Together
from services.worker.seq2seq import Seq2Seq


class Doubler:
    """A layer run for all: each forward's rows back, doubled; counts how often it ran."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def forward_together(self, inputs):
        self.calls.append(len(inputs))
        if self.fail:
            raise ValueError("layer broke")
        return [hidden * 2 for hidden, _, _ in inputs]


def run_threads(n, body, timeout=10):
    results, threads = [None] * n, []
    for i in range(n):
        def target(i=i):
            try:
                results[i] = body(i)
            except BaseException as exc:
                results[i] = exc
        threads.append(threading.Thread(target=target))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a forward waits forever"
    return results


def test_forwards_meet_and_each_gets_its_rows():
    lockstep, layer = Lockstep(3), Doubler()

    def body(i):
        lockstep.local.index = i
        x = torch.full((1, 4), float(i))
        for _ in range(2):  # two MoE layers
            x = lockstep.meet(layer, x, (), {})
        return x

    results = run_threads(3, body)
    assert layer.calls == [3, 3], "one run per layer, for all three forwards"
    assert [r[0, 0].item() for r in results] == [0.0, 4.0, 8.0]


def test_a_failing_layer_fails_every_forward_with_its_own_error_in_the_compute_thread():
    lockstep = Lockstep(3)

    def body(i):
        lockstep.local.index = i
        return lockstep.meet(Doubler(fail=True), torch.ones(1, 4), (), {})

    results = run_threads(3, body)
    assert type(results[0]) is ValueError and "layer broke" in str(results[0])  # forward 0 ran it: the error as is
    assert all(isinstance(r, PeerFailed) and "layer broke" in str(r) for r in results[1:])


class MemdGone(RuntimeError):
    """Stands in for MemdDeadError: the worker's server tells it apart by its type."""


def test_together_raises_the_layers_error_with_its_type():
    steps = StubSteps()

    class Failing:
        def forward_together(self, inputs):
            raise MemdGone("memd died")

    def forward():
        return steps.lockstep.meet(Failing(), torch.ones(1, 2), (), {})

    with pytest.raises(MemdGone, match="memd died"):
        Together(steps).run([forward] * 3)
    assert steps.lockstep is None


class StubModel:
    """A decoder forward that meets at one MoE layer, or fails before it for one request."""

    def __init__(self, steps, failing: set[int]):
        self.steps, self.failing = steps, failing
        self.generation_config = SimpleNamespace(decoder_start_token_id=0)
        self.config = SimpleNamespace(decoder_start_token_id=0)
        self.layer = Doubler()

    def __call__(self, *, decoder_input_ids, past_key_values, **kwargs):
        if past_key_values in self.failing:
            raise ValueError("attention broke")
        out = self.steps.lockstep.meet(self.layer, torch.ones(1, 3), (), {})
        return SimpleNamespace(logits=out.view(1, 1, 3))


class StubSteps:
    lockstep = None

    def begin(self, *args, **kwargs):
        pass


def seqs(n):
    return [SimpleNamespace(request_id=f"r{i}", req=SimpleNamespace(prompt=[1, 2]), generated=[], encoded=object(),
                            cache=i) for i in range(n)]


def test_decode_together_batches_the_moe_layers():
    steps = StubSteps()
    model = StubModel(steps, set())
    logits = Seq2Seq(model, steps).decode_together(seqs(3))
    assert model.layer.calls == [3] and [l.tolist() for l in logits] == [[2.0] * 3] * 3
    assert steps.lockstep is None


def test_one_forward_failing_fails_the_step_without_a_hang():
    steps = StubSteps()
    seq2seq = Seq2Seq(StubModel(steps, {1}), steps)
    done = []
    worker = threading.Thread(target=lambda: done.append(_raises(lambda: seq2seq.decode_together(seqs(3)))))
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the step hangs"
    assert isinstance(done[0], ValueError) and "attention broke" in str(done[0])
    assert steps.lockstep is None


def _raises(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value
