"""Continuous batching through a real worker: requests that run together give each the tokens it gets alone.

All requests go over one DEALER socket, as the gateway sends them, so the replies arrive in the order the worker
published them: step by step. That makes interleaving, fairness and cancellation checkable without timing.
"""
import uuid

import pytest
import zmq
from helpers import FAMILIES, Stack

from common import messages as m
from common.codec import decode, encode
from common.protocol import Op
from common.worker_client import WorkerClient
from common.zmq_utils import make_socket

# prompts of different lengths (several longer than the prefill chunk) and different max_tokens
PROMPTS = [[(7 * i + 3 * j) % 300 + 2 for j in range(n)] for i, n in enumerate((3, 41, 9, 26, 17, 50, 5, 33))]
MAX_TOKENS = [14, 6, 20, 9, 12, 7, 18, 10]
LIMITS = ["--max-running", "8", "--max-step-tokens", "48", "--max-prefill-chunk", "16"]


class Mux:
    """Many requests on one socket; ``events`` lists ``(request, TokensReply)`` in arrival order."""

    def __init__(self, addr: str):
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, addr, bind=False)
        self.rids: dict[int, str] = {}
        self.events: list[tuple[str, m.TokensReply]] = []
        self.finished: set[str] = set()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def send(self, op: Op, msg) -> None:
        rid = len(self.rids) + 1
        self.rids[rid] = getattr(msg, "request", "")
        self.sock.send(encode(op, rid, msg))

    def submit(self, request: str, prompt: list[int], max_tokens: int, **params) -> str:
        self.send(Op.GENERATE, m.GenerateRequest(request, prompt, max_tokens, **params))
        return request

    def receive(self, timeout_s: float = 120) -> tuple[str, m.TokensReply | m.CancelReply]:
        assert self.sock.poll(int(timeout_s * 1000)), "the worker stopped answering"
        op, rid, reply = decode(self.sock.recv(), reply=True)
        assert not isinstance(reply, m.ErrorReply), reply
        if isinstance(reply, m.TokensReply):
            self.events.append((self.rids[rid], reply))
            if reply.finish_reason is not None:
                self.finished.add(self.rids[rid])
        return self.rids[rid], reply

    def run(self, until: set[str], on_event=None) -> None:
        while not until <= self.finished:
            request, reply = self.receive()
            if on_event is not None:
                on_event(request, reply)

    def tokens(self, request: str) -> tuple[list[int], str | None]:
        replies = [r for q, r in self.events if q == request]
        return [t for r in replies for t in r.tokens], replies[-1].finish_reason if replies else None


def alone(addr: str, prompts, max_tokens, **params) -> list[tuple[list[int], str]]:
    client = WorkerClient(addr)
    try:
        return [client.generate(p, n, **params) for p, n in zip(prompts, max_tokens)]
    finally:
        client.close()


def max_streaming(mux: Mux) -> int:
    """The most requests that had started and not finished streaming at one point of the reply order."""
    first, last = {}, {}
    for i, (request, _) in enumerate(mux.events):
        first.setdefault(request, i)
        last[request] = i
    return max(sum(first[r] <= i <= last[r] for r in first) for i in range(len(mux.events)))


# mixtral and gpt_oss in the default run (their routers and attention differ most); every family in the slow run
# (the family matrix batches every family too)
@pytest.mark.parametrize("family", [f if f in ("mixtral", "gpt_oss") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_concurrent_requests_equal_their_solo_outputs(family, checkpoints, state_dir):
    with Stack(checkpoints[family], state_dir, expert_memory="25%", extra_worker=LIMITS) as stack:
        expected = alone(stack.worker_addr, PROMPTS, MAX_TOKENS)
        mux = Mux(stack.worker_addr)
        try:
            first = [mux.submit(f"a{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS[:5], MAX_TOKENS[:5]))]
            while len(mux.events) < 6:  # the rest join while the first ones decode
                mux.receive()
            later = [mux.submit(f"a{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)) if i >= 5]
            mux.run(set(first + later))
        finally:
            mux.close()
    for i, (tokens, reason) in enumerate(expected):
        assert mux.tokens(f"a{i}") == (tokens, reason), f"{family}: request {i} differs from its solo run"
    assert len(set(tuple(t) for t, _ in expected)) == len(expected), "degenerate oracle: equal outputs"
    assert max_streaming(mux) >= 6, "the requests did not run together"


@pytest.fixture(scope="module")
def stack(mixtral, tmp_path_factory):
    state = tmp_path_factory.mktemp("batch") / "state"
    limits = ["--max-running", "4", "--max-step-tokens", "20", "--max-prefill-chunk", "16"]
    with Stack(mixtral, state, expert_memory="100%", extra_worker=limits) as s:
        yield s


@pytest.fixture
def mux(stack):
    mx = Mux(stack.worker_addr)
    yield mx
    mx.close()


def test_cancelling_one_request_leaves_the_others_alone(stack, mux):
    """The victim is long (200 tokens) so that the worker, which can run ahead of this reader on a loaded machine,
    cannot finish it before the cancel sent at its fifth token arrives."""
    prompts, lengths = PROMPTS[:4], [30, 200, 30, 30]
    expected = alone(stack.worker_addr, prompts, lengths)
    ids = [mux.submit(f"c{i}-{uuid.uuid4().hex[:6]}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    victim = ids[1]

    def cancel_early(request, reply):
        if isinstance(reply, m.TokensReply) and request == victim and reply.finish_reason is None and reply.tokens \
                and len(mux.tokens(victim)[0]) == 5:
            mux.send(Op.CANCEL, m.CancelRequest(victim))

    mux.run(set(ids), cancel_early)
    tokens, reason = mux.tokens(victim)
    assert reason == "cancelled" and 5 <= len(tokens) < 200 and tokens == expected[1][0][:len(tokens)]
    for i in (0, 2, 3):
        assert mux.tokens(ids[i]) == tuple(expected[i])


def test_stop_conditions_apply_per_request(stack, mux):
    prompts = PROMPTS[:3]
    full = alone(stack.worker_addr, prompts, [16, 16, 16])
    stop_at = full[0][0][3]
    ids = [mux.submit(f"s0-{uuid.uuid4().hex[:6]}", prompts[0], 16, stop_token_ids=[stop_at]),
           mux.submit(f"s1-{uuid.uuid4().hex[:6]}", prompts[1], 5),
           mux.submit(f"s2-{uuid.uuid4().hex[:6]}", prompts[2], 16)]
    mux.run(set(ids))
    stopped = full[0][0][:full[0][0].index(stop_at) + 1]
    assert mux.tokens(ids[0]) == (stopped, "stop")
    assert mux.tokens(ids[1]) == (full[1][0][:5], "length")
    assert mux.tokens(ids[2]) == tuple(full[2])


def replies_between(order: list[str], request: str) -> list[int]:
    """For each pair of consecutive replies of ``request``: how many replies of others came in between."""
    mine = [i for i, r in enumerate(order) if r == request]
    return [b - a - 1 for a, b in zip(mine, mine[1:])]


def test_long_prompt_is_prefilled_in_chunks_next_to_decoding_requests(stack, mux):
    """A 158-token prompt takes 10 chunks of 16: the running request gets a token in each of those steps."""
    runner = mux.submit("runner", [3, 4, 5], 40)
    while len(mux.tokens(runner)[0]) < 2:
        mux.receive()
    long_id = mux.submit("long-prompt", list(range(2, 160)), 2)
    mux.run({long_id})
    order = [request for request, _ in mux.events]
    first_token = next(i for i, (q, r) in enumerate(mux.events) if q == long_id and r.tokens)  # (not a chunk's)
    during = order[order.index("runner") + 2:first_token]
    assert during.count(runner) >= 8, "the running request stalled while the long prompt was prefilled"
    mux.run({runner})
    assert mux.tokens(runner)[1] == "length"


def test_short_requests_finish_while_a_long_one_runs(stack, mux):
    """One long request and ten short ones behind it: with 4 running slots the shorts take turns next to it, each
    running request gets one token per step, and every short finishes before the long one (checked in the order the
    worker published its replies, however late this process reads them)."""
    long_id = mux.submit("long", list(range(2, 60)), 100)  # ~100 steps; the ten shorts need ~20 of them
    shorts = [mux.submit(f"short{i}", [5 + i, 7, 9], 4) for i in range(10)]
    mux.run({long_id, *shorts})
    order = [request for request, _ in mux.events]
    assert all(mux.tokens(s)[1] == "length" for s in shorts), "a short request never finished"
    assert mux.tokens(long_id)[1] == "length", "the long request stopped early: the test needs it to run on"
    long_end = len(order) - 1 - order[::-1].index(long_id)
    ends = {s: len(order) - 1 - order[::-1].index(s) for s in shorts}
    assert all(end < long_end for end in ends.values()), \
        f"a short waited for the long one: last replies at {ends}, the long's at {long_end} (of {len(order)})"
    assert max(replies_between(order, long_id)) <= 3, "the long request went a step without a token"
    # A step replies to its decoding requests in the order they joined, then to those whose prompt it finished: the
    # step that ends the long prompt replies to it after the shorts, the next one before them, so a short can see it
    # twice between two of its tokens (4 others with 4 running); a step without a token for a short would put every
    # other running request's reply of two steps in between (6).
    for s in shorts:
        assert max(replies_between(order, s)) <= 4, f"{s} went a step without a token"


def test_a_long_prompts_chunks_each_say_the_request_is_under_way(stack, mux):
    """A prompt prefilled over several steps (``--max-prefill-chunk 16``: 40 tokens in 16 + 16 + 8) gets a reply
    without tokens after each chunk but its last, so the gateway hears the request is under way (its
    ``--step-timeout-s`` counts silence, not a long prefill); then its tokens, as alone."""
    prompt = [3 + (7 * i) % 300 for i in range(40)]
    expected = alone(stack.worker_addr, [prompt], [4])[0]
    request = mux.submit(f"long-{uuid.uuid4().hex[:6]}", prompt, 4)
    mux.run({request})
    replies = [r for q, r in mux.events if q == request]
    assert [len(r.tokens) for r in replies[:2]] == [0, 0] and all(r.tokens for r in replies[2:]), replies
    assert mux.tokens(request) == tuple(expected)
