"""Sampling is per request: parameters the sampler cannot take are clamped (documented in engine.py), a request
whose distribution is degenerate fails alone, and its batch-mates get the tokens they get alone."""
import asyncio
import threading
import uuid

import pytest
import torch
from helpers import Stack, write_family
from transformers import DynamicCache
from test_batching import PROMPTS, Mux, alone

from common import messages as m
from common.codec import decode
from services.worker.engine import GREEDY_TEMPERATURE, Engine, ModelOutputError, SamplingError, Sequence, sample
from services.worker.scheduler import Chunk


def req(**params) -> m.GenerateRequest:
    return m.GenerateRequest("r", [1, 2], 4, **params)


def test_tiny_temperatures_are_greedy_and_small_ones_are_sampled_as_asked():
    logits = torch.randn(320) * 30
    for t in (1e-300, GREEDY_TEMPERATURE / 2):
        assert sample(logits, req(temperature=t), torch.Generator().manual_seed(0)) == int(torch.argmax(logits))
    close = torch.zeros(320)
    close[:2] = torch.tensor([1.0, 1.0 - 2e-5])  # two tokens within 2e-5: t=1e-5 draws the second ~12% of the time
    draws = [sample(close, req(temperature=1e-5), torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1} and 5 < draws.count(1) < 60  # (no clamp to a larger temperature: ~50% there)


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.randn(320)
    for _ in range(5):
        assert sample(logits, req(temperature=1.0, top_p=1e-300), torch.Generator()) == int(torch.argmax(logits))


def test_top_k_beyond_the_vocabulary_is_off():
    logits = torch.randn(320)
    for seed in range(5):  # the same draws as with top-k off
        beyond = sample(logits, req(temperature=1.0, top_k=10**9), torch.Generator().manual_seed(seed))
        assert beyond == sample(logits, req(temperature=1.0, top_k=0), torch.Generator().manual_seed(seed))


def test_non_finite_logits_raise_a_sampling_error():
    logits = torch.zeros(320)
    logits[5] = float("inf")  # (a distribution the request's own parameters could make degenerate: a 400)
    with pytest.raises(SamplingError, match="not finite") as raised:
        sample(logits, req(temperature=1.0), torch.Generator())
    assert raised.value.code == "bad_request"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_fail_the_request_as_the_models_fault_even_greedy(temperature):
    """argmax over NaN picks an index (0, or the NaN's) and greedy decoding would go on emitting garbage."""
    logits = torch.randn(320)
    logits[7] = float("nan")
    with pytest.raises(ModelOutputError, match="hold NaN") as raised:
        sample(logits, req(temperature=temperature), torch.Generator())
    assert raised.value.code == "internal"


class StubFlatStep:
    """The forward of a step, replaced by given logits (one row per sampled chunk)."""

    recurrent = False

    def __init__(self, rows):
        self.rows = rows

    def forward(self, parts, rows):
        return self.rows


def test_a_degenerate_request_fails_alone_in_its_step():
    engine = Engine.__new__(Engine)
    engine.max_model_len, engine.vocab_size, engine.steps, engine.seq2seq = 64, 320, None, None
    good, bad = torch.randn(320), torch.full((320,), float("nan"))
    engine.flat_step = StubFlatStep([good, bad])
    seqs = [Sequence(m.GenerateRequest(f"r{i}", [1, 2, 3], 4, temperature=1.0), None, torch.Generator())
            for i in range(2)]
    tokens = engine.run([Chunk(seq, seq.req.prompt) for seq in seqs])
    assert tokens[0] is not None and seqs[0].error is None and seqs[0].generated == [tokens[0]]
    assert tokens[1] is None and "hold NaN" in seqs[1].error and seqs[1].generated == []
    assert seqs[1].error_code == "internal"


class _Loop:
    def call_soon_threadsafe(self, fn, *args):
        fn(*args)

    def is_closed(self):
        return False


class _Steps:
    def request_ended(self, request, generated):
        pass

    def abort(self):
        self.aborted = True


def bare_server(run=None, scheduler=None):
    """A WorkerServer without sockets or model: its compute side over a stub engine (``run``) and ``scheduler``."""
    from services.worker.scheduler import Limits, Scheduler
    from services.worker.server import WorkerServer

    server = WorkerServer.__new__(WorkerServer)
    server.engine = type("StubEngine", (), {"steps": _Steps(), "run": staticmethod(run or (lambda step: []))})()
    server.client = type("Client", (), {"emit": lambda self, op, event: None})()
    server.loop = _Loop()
    server.scheduler = scheduler if scheduler is not None else Scheduler(Limits(4, 16, 8, 4))  # (an empty one is falsy)
    server.outbox, server.live, server.cancelled, server.generated_tokens = asyncio.Queue(), {}, set(), 0
    server.stopping, server.compute_stuck = threading.Event(), False
    return server


def replies_of(server) -> dict:
    """The replies the server queued, by request id (rid)."""
    replies = {}
    while not server.outbox.empty():
        _, frame = server.outbox.get_nowait()
        _, rid, reply = decode(frame, reply=True)
        replies[rid] = reply
    return replies


def test_the_worker_answers_the_failed_request_alone():
    from services.worker.server import Job

    def run(step):
        step[1].seq.error, step[1].seq.error_code = "the model's logits hold NaN", "internal"
        return [7, None]

    server = bare_server(run)
    seqs = [Sequence(m.GenerateRequest(f"r{i}", [1], 4), None, None) for i in range(2)]
    seqs[0].generated.append(7)
    server.jobs = {s.request_id: Job(b"gw", i + 1, s) for i, s in enumerate(seqs)}
    server.run_step([Chunk(s, [1]) for s in seqs])
    replies = replies_of(server)
    assert isinstance(replies[1], m.TokensReply) and replies[1].tokens == [7]
    assert isinstance(replies[2], m.ErrorReply) and replies[2].code == "internal"
    assert list(server.jobs) == ["r0"]


def test_a_step_that_fails_is_run_again_request_by_request():
    """One request whose forward raises (here: whenever it is in the step) must not fail its batch-mates: the
    failed step's caches are rewound and each request runs alone; only the one that fails alone fails."""
    from services.worker.server import Job

    def run(step):
        if any(c.seq.request_id == "bad" for c in step):
            raise RuntimeError("a forward that fails for this request")
        for c in step:
            c.seq.cached += len(c.tokens)
            c.seq.generated.append(7)
        return [7] * len(step)

    server = bare_server(run)
    rewound = []
    server.engine.rewind = lambda step: rewound.append([c.seq.request_id for c in step]) or True
    server.engine.device = torch.device("cpu")
    seqs = [Sequence(m.GenerateRequest(name, [1], 4), None, None) for name in ("good", "bad", "also")]
    server.jobs = {s.request_id: Job(b"gw", i + 1, s) for i, s in enumerate(seqs)}
    server.run_step([Chunk(s, [1]) for s in seqs])
    replies = replies_of(server)
    assert rewound == [["good", "bad", "also"]] and server.engine.steps.aborted  # (its trace is not sent)
    assert replies[1].tokens == [7] and replies[3].tokens == [7]
    assert isinstance(replies[2], m.ErrorReply) and replies[2].code == "internal"


def test_a_failed_step_rewinds_each_cache_to_what_its_request_had():
    from services.worker.kv_cache import GrowingLayer

    engine = Engine.__new__(Engine)
    engine.seq2seq = engine.flat_step = None
    seq = Sequence(m.GenerateRequest("r", [1, 2, 3], 4), cache_of([GrowingLayer(), GrowingLayer()]), None)
    seq.cached = 3
    for n, layer in zip((4, 3), seq.cache.layers):  # the first layer had appended the failed step's token
        layer.update(torch.zeros(1, 2, n, 8), torch.zeros(1, 2, n, 8))
    assert engine.rewind([Chunk(seq, [4])]) and [layer.get_seq_length() for layer in seq.cache.layers] == [3, 3]
    seq.cache.layers.append(object())  # a layer that cannot be rewound (sliding, recurrent): no rerun
    assert not engine.rewind([Chunk(seq, [4])])

    class StateBesideLayers(DynamicCache):  # MiniMax's: its linear attention's state is not in ``layers``
        is_croppable = False

    beside = Sequence(m.GenerateRequest("s", [1], 4), StateBesideLayers(), None)
    beside.cache.layers = [GrowingLayer()]
    assert not engine.rewind([Chunk(beside, [1])])


def test_a_step_that_failed_after_a_request_moved_on_is_not_run_again():
    """A failure after the forward (a request's ``cached`` already counts the step) cannot be undone: the step's
    requests fail, none runs twice."""
    def run(step):
        step[0].seq.cached += 1
        raise RuntimeError("after the forward")

    server = bare_server(run)
    server.engine.rewind = lambda step: pytest.fail("rewound a step a request had moved on in")
    server.engine.device = torch.device("cpu")
    seqs = [Sequence(m.GenerateRequest(f"r{i}", [1], 4), None, None) for i in range(2)]
    from services.worker.server import Job

    server.jobs = {s.request_id: Job(b"gw", i + 1, s) for i, s in enumerate(seqs)}
    server.run_step([Chunk(s, [1]) for s in seqs])
    assert all(isinstance(r, m.ErrorReply) for r in replies_of(server).values())


def cache_of(layers):
    cache = DynamicCache()
    cache.layers = layers
    return cache


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model = write_family("mixtral", tmp_path_factory.mktemp("ckpt") / "mixtral")
    limits = ["--max-running", "4", "--max-step-tokens", "64", "--max-prefill-chunk", "16"]
    with Stack(model, tmp_path_factory.mktemp("sampling") / "state", expert_memory="100%", extra_worker=limits) as s:
        yield s


def test_extreme_parameters_never_break_batch_mates(stack):
    """temperature 1e-300 and top_p 1e-300 once failed the whole step ("probability tensor contains inf")."""
    prompts = PROMPTS[:3]
    expected, nucleus = alone(stack.worker_addr, [prompts[0], prompts[2]], [12, 12])
    mux = Mux(stack.worker_addr)
    try:
        ids = [mux.submit(f"g-{uuid.uuid4().hex[:6]}", prompts[0], 12),
               mux.submit(f"t-{uuid.uuid4().hex[:6]}", prompts[1], 12, temperature=1e-300, seed=1),
               mux.submit(f"p-{uuid.uuid4().hex[:6]}", prompts[2], 12, temperature=1.0, top_p=1e-300, seed=1)]
        mux.run(set(ids))
    finally:
        mux.close()
    assert mux.tokens(ids[0]) == tuple(expected)
    tokens, reason = mux.tokens(ids[1])  # (sampled at the lowest temperature the sampler takes: not always greedy)
    assert reason in ("length", "stop") and tokens
    assert mux.tokens(ids[2]) == tuple(nucleus)  # top-p keeps the most likely token: greedy, batch or not


def test_an_error_outside_a_step_stops_the_worker_and_answers_everyone():
    """A failure of the compute loop itself (not of a step, which fails its own requests) must not leave a worker
    that answers ready and never computes: its requests, running or still queued, get an error and it stops."""
    import queue
    import threading

    from services.worker.server import Job

    class Scheduler:
        def __bool__(self):
            return True

        def schedule(self):
            raise RuntimeError("a bug outside any step")

        def remove(self, seq):
            pass

    server = bare_server(scheduler=Scheduler())
    server.stopping, server.exit_code, server.inbox = threading.Event(), 0, queue.Queue()
    server.take_new = lambda wait: None
    seq = Sequence(m.GenerateRequest("running", [1], 4), None, None)
    server.jobs = {"running": Job(b"gw", 1, seq)}
    server.inbox.put((b"gw", 2, m.GenerateRequest("queued", [1], 4)))
    server.compute_loop()  # returns: no exception escapes the thread
    assert server.stopping.is_set() and server.exit_code == 1
    replies = replies_of(server)
    assert set(replies) == {1, 2} and all(isinstance(r, m.ErrorReply) for r in replies.values())
    assert all("the worker failed" in r.message for r in replies.values()), replies


def test_an_unseeded_request_leaves_the_process_generators_alone():
    """Each sampled request draws from a generator of its own, seeded from the OS: starting one never reseeds
    torch's global generators (which other code in the process may rely on)."""
    from types import SimpleNamespace

    torch.manual_seed(1234)
    stub = SimpleNamespace(validate=lambda r: None, seq2seq=None, flat_step=SimpleNamespace(new_cache=lambda n: None))
    seqs = [Engine.start(stub, req(temperature=1.0)) for _ in range(2)]
    assert torch.initial_seed() == 1234
    assert seqs[0].generator.initial_seed() != seqs[1].generator.initial_seed()
    assert Engine.start(stub, req(temperature=1.0, seed=7)).generator.initial_seed() == 7
