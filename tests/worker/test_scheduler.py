"""The scheduler alone: joins, token budget, prompt chunks, decode-first, fairness, bounds."""
from dataclasses import dataclass, field

import pytest

from common.config import WorkerConfig
from services.worker.scheduler import CapacityError, Limits, Scheduler


@dataclass(eq=False)
class Seq:
    """A stand-in for engine.Sequence: a prompt, then ``max_tokens`` generated tokens."""

    request_id: str
    prompt: int
    max_tokens: int
    cached: int = 0
    generated: list[int] = field(default_factory=list)

    @property
    def kv_tokens(self) -> int:
        return self.prompt + self.max_tokens

    @property
    def prompt_left(self) -> int:
        return max(self.prompt - self.cached, 0)

    def next_tokens(self, limit: int) -> list[int]:
        if self.prompt_left:
            return list(range(self.cached, self.cached + min(limit, self.prompt_left)))
        return [len(self.generated)]

    def advance(self, n: int) -> bool:
        """The engine's side of a step; True when the sequence is done."""
        self.cached += n
        if self.cached >= self.prompt + len(self.generated):
            self.generated.append(0)
        return len(self.generated) >= self.max_tokens


def limits(running=4, step=24, chunk=16, waiting=8) -> Limits:
    return Limits(max_running=running, max_step_tokens=step, max_prefill_chunk=chunk, max_waiting=waiting)


def simulate(scheduler: Scheduler, arrivals: dict[int, list[Seq]], steps: int = 500):
    """Run steps; returns per step the list of (request, tokens scheduled) and the step each request finished."""
    history, finished = [], {}
    for n in range(steps):
        for seq in arrivals.get(n, []):
            scheduler.add(seq)
        step = scheduler.schedule()
        history.append([(c.seq.request_id, len(c.tokens)) for c in step])
        for chunk in step:
            if chunk.seq.advance(len(chunk.tokens)):
                scheduler.remove(chunk.seq)
                finished[chunk.seq.request_id] = n
        if not scheduler and not any(k > n for k in arrivals):
            break
    return history, finished


def test_prompt_chunks_start_at_multiples_of_the_chunk_size_whatever_runs_beside():
    alone, _ = simulate(Scheduler(limits()), {0: [Seq("p", 50, 2)]})
    crowded, _ = simulate(Scheduler(limits()), {0: [Seq("a", 3, 30), Seq("b", 5, 30), Seq("p", 50, 2)]})
    chunks = lambda history: [n for step in history for r, n in step if r == "p" and n > 1]  # noqa: E731
    assert chunks(alone) == chunks(crowded) == [16, 16, 16, 2]


def test_every_decoding_request_gets_a_token_every_step():
    history, _ = simulate(Scheduler(limits()), {0: [Seq("a", 2, 40)], 3: [Seq("long", 200, 3)], 5: [Seq("b", 2, 9)]})
    for step in history:
        assert sum(n for _, n in step) <= 24 and all(n <= 16 for _, n in step)
    a_steps = [i for i, step in enumerate(history) if any(r == "a" for r, _ in step)]
    assert a_steps == list(range(a_steps[0], a_steps[-1] + 1)), "a decoding request skipped a step"


def test_decode_tokens_come_first_and_the_oldest_prompt_next():
    scheduler = Scheduler(limits(step=20))
    old, new = Seq("old", 40, 2), Seq("new", 40, 2)
    scheduler.add(Seq("d", 1, 10))
    scheduler.schedule()[0].seq.advance(1)  # d has its first token: it decodes from now on
    scheduler.add(old)
    scheduler.add(new)
    step = scheduler.schedule()
    assert [(c.seq.request_id, len(c.tokens)) for c in step] == [("d", 1), ("old", 16)]


def test_requests_join_in_arrival_order_up_to_max_running():
    scheduler = Scheduler(limits(running=2))
    seqs = [Seq(f"r{i}", 2, 3) for i in range(5)]
    _, finished = simulate(scheduler, {0: seqs})
    assert [finished[f"r{i}"] for i in range(5)] == sorted(finished[f"r{i}"] for i in range(5))
    assert len(scheduler.running) == 0 and len(scheduler.waiting) == 0


def test_short_requests_do_not_wait_for_a_long_one():
    arrivals = {0: [Seq("long", 100, 200)], **{k: [Seq(f"s{k}", 4, 5)] for k in range(1, 60, 2)}}
    _, finished = simulate(Scheduler(limits()), arrivals, steps=1000)
    assert all(finished[f"s{k}"] < finished["long"] for k in range(1, 60, 2))


def test_waiting_requests_are_bounded_with_the_knob_in_the_error():
    scheduler = Scheduler(limits(running=1, waiting=2))
    for i in range(3):
        scheduler.add(Seq(f"r{i}", 2, 2))
    with pytest.raises(CapacityError, match="--max-queued"):
        scheduler.add(Seq("r3", 2, 2))


def test_removing_a_request_frees_its_slot():
    scheduler = Scheduler(limits(running=1))
    a, b = Seq("a", 2, 50), Seq("b", 2, 50)
    scheduler.add(a)
    scheduler.add(b)
    assert [c.seq for c in scheduler.schedule()] == [a]
    scheduler.remove(a)
    assert [c.seq for c in scheduler.schedule()] == [b]


@pytest.mark.parametrize("flags,message", [
    ({"max_running": 0}, "--max-running must be >= 1"),
    ({"max_step_tokens": 100, "max_prefill_chunk": 96, "max_running": 8}, "--max-step-tokens (100) must be >="),
])
def test_worker_config_checks_the_batching_knobs(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WorkerConfig(model=tmp_path, **flags)


def test_batching_knobs_come_from_flags_and_environment(tmp_path):
    from common.config import build_config

    cfg = build_config(WorkerConfig, env={"MOEINF_MAX_RUNNING": "3", "MOEINF_MAX_STEP_TOKENS": "64"}, model=tmp_path,
                       max_prefill_chunk="32")
    assert Limits.from_config(cfg) == Limits(3, 64, 32, cfg.max_queued)


def test_requests_join_while_their_kv_cache_reservations_fit_the_budget():
    """--kv-cache-memory: the running requests' reservations stay within the budget; the next waits (not overtaken
    by a smaller one behind it) and joins when one finishes; one above the whole budget runs alone, never stuck
    (a reservation errs high); until the meter knows a token's cost (None), requests join as --max-running allows."""
    known = {"yes": True}
    reserve = lambda seq: seq.kv_tokens * 10 if known["yes"] else None  # noqa: E731 (10 bytes a token)
    budget = Limits(max_running=4, max_step_tokens=64, max_prefill_chunk=16, max_waiting=8, kv_bytes=1000)
    a, b, c = Seq("a", 40, 20), Seq("b", 30, 20), Seq("c", 2, 2)  # 600, 500 and 40 bytes
    history, finished = simulate(Scheduler(budget, reserve), {0: [a, b, c]})
    assert {r for r, _ in history[0]} == {"a"}  # a + b: 1100 bytes; c would fit beside a, but it is behind b
    joined = {r: next(n for n, step in enumerate(history) if any(x == r for x, _ in step)) for r in "bc"}
    assert joined == {"b": finished["a"] + 1, "c": finished["a"] + 1}
    huge, small = Seq("huge", 100, 1), Seq("small", 2, 2)  # 1010 bytes: above the budget, alone
    history, finished = simulate(Scheduler(budget, reserve), {0: [huge, small]})
    assert {r for r, _ in history[0]} == {"huge"} and set(finished) == {"huge", "small"}
    assert next(n for n, step in enumerate(history) if any(x == "small" for x, _ in step)) == finished["huge"] + 1
    known["yes"] = False
    unknown = Scheduler(Limits(4, 64, 16, 8, kv_bytes=1000), reserve)
    for seq in (Seq("a", 40, 20), Seq("b", 30, 20), Seq("c", 2, 2), Seq("huge", 100, 1)):
        unknown.add(seq)
    unknown.schedule()
    assert [seq.request_id for seq in unknown.running] == ["a", "b", "c", "huge"]


def test_whole_prompts_are_prefilled_in_one_step_whatever_their_size():
    """A model whose forward depends on how a prompt is split (indexed attention) gets each prompt in one step: the
    first prompt of a step runs whole even above the step budget; the next waits for a step of its own."""
    import dataclasses

    scheduler = Scheduler(dataclasses.replace(limits(step=24, chunk=16), whole_prompts=True))
    history, finished = simulate(scheduler, {0: [Seq("a", 3, 2)], 1: [Seq("big", 50, 2), Seq("next", 20, 2)]})
    assert history[0] == [("a", 3)] and history[1] == [("a", 1), ("big", 50)]  # not 16 + 7
    assert history[2] == [("big", 1), ("next", 20)] and set(finished) == {"a", "big", "next"}
