"""Replaying a routing trace against a real memd, as the worker would drive it (``moeinf bench replay``).

``load_plan`` turns a ``moeinf-trace/1`` file into forward steps as the trace recorded them (``group_steps``: a
prompt is one step with all its tokens, each decode token one more step; batched requests share steps), with
each layer's routing precomputed as the worker computes it: the layer's unique experts, ``tokens[r][j]`` per
request and the sums of the router weights.

``drive`` then sends, through the worker's own ``MemdClient``, what the worker sends: ``REQUEST_START`` before
a request's first step; per step and MoE layer, in the worker's order, a ``LAYER_NOTE`` (``MemdClient.note``,
none where memd's replies say it takes none, as at a pool of every expert:
the routing, the step number, the prefill flags and the trace's guesses as the worker sends them: ``guesses``), then an
acquire without routing (none goes out when every expert is leased), the release (none with leases: memd revokes
them), then the layer's compute time: a sleep until ``layer_seconds`` after the acquire returned, so that the
replay's own Python work counts in that time instead of adding to it (memd measures a layer's compute as the time
between its notes less the acquire's wait, and the simulator takes ``layer_seconds`` exactly);
one ``STEP_TRACE`` once the step is over; ``REQUEST_END`` after a request's last step. When a step ends every
request it ran, the worker has nothing left to run and returns its leases (requests of a trace are taken to arrive
once the earlier ones are done, as with the closed-loop clients the trace files were recorded with).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import messages as m
from common.protocol import Op
from common.traces import LayerRouting, Step, TraceHeader, group_steps, read_trace


@dataclass(slots=True)
class ReplayStep:
    requests: list[str]
    tokens: list[int]  # per request
    prefill: list[bool]  # per request
    layers: list[LayerRouting]
    starts: list[tuple[str, int]] = field(default_factory=list)  # (request, prompt tokens) starting here
    ends: list[tuple[str, int]] = field(default_factory=list)  # (request, generated tokens) ending after it


@dataclass(slots=True)
class ReplayPlan:
    path: Path
    header: TraceHeader
    steps: list[ReplayStep]

    @property
    def tokens(self) -> int:
        return sum(sum(s.tokens) for s in self.steps)

    @property
    def decode_tokens(self) -> int:
        return sum(t for s in self.steps for t, p in zip(s.tokens, s.prefill) if not p)

    def accesses(self) -> list[list[tuple[int, int]]]:
        """Per layer of every step, the (layer, expert) keys it acquires together (for ``bounds``)."""
        return [[(r.layer, e) for e in r.experts] for s in self.steps for r in s.layers]


def load_plan(path: Path | str, max_steps: int | None = None) -> ReplayPlan:
    """The trace's steps (the first ``max_steps``, if given), ready to replay; TraceError on a malformed file."""
    header, records = read_trace(path)
    steps = []
    for step in group_steps(records):
        steps.append(step)
        if max_steps is not None and len(steps) >= max_steps:
            break
    return ReplayPlan(Path(path), header, _replay_steps(steps))


def _replay_steps(steps: list[Step]) -> list[ReplayStep]:
    last = {r: i for i, s in enumerate(steps) for r in s.requests}
    seen: dict[str, list[int]] = {}  # request -> [prompt tokens, decode tokens]
    out = []
    for i, step in enumerate(steps):
        prefill = [step.phase[r] == "prefill" for r in step.requests]
        tokens = [len(step.tokens[r]) for r in step.requests]
        rs = ReplayStep(list(step.requests), tokens, prefill, [step.routing(layer) for layer in sorted(step.layers)])
        for r, n, p in zip(step.requests, tokens, prefill):
            if r not in seen:
                seen[r] = [0, 0]
                rs.starts.append((r, n if p else 0))
            seen[r][0 if p else 1] += n
            if last[r] == i:
                rs.ends.append((r, seen[r][1]))
        out.append(rs)
    return out


def guesses(r: LayerRouting, num_layers: int, client) -> tuple[list[int], list[int], list[float]]:
    """The note's guesses, as a worker sends them: none when memd's last reply said it has no use for them; else
    the trace's ``guesses`` within memd's lookahead and confidence threshold (``client.speculate_layers`` /
    ``speculate_threshold``, the worker's defaults until memd replies), or, in a trace without them, its
    ``speculated`` experts as MoE layer ``layer + 1``'s at confidence 1.0 (none for the last layer)."""
    if not client.speculate:
        return [], [], []
    if r.guesses:
        picks = [(r.layer + d, e, c) for d, e, c in r.guesses
                 if d <= client.speculate_layers and c >= client.speculate_threshold]
        return [t for t, _, _ in picks], [e for _, e, _ in picks], [c for _, _, c in picks]
    if not r.speculated or r.layer + 1 >= num_layers:
        return [], [], []
    return [r.layer + 1] * len(r.speculated), list(r.speculated), [1.0] * len(r.speculated)


@dataclass(slots=True)
class DriveResult:
    seconds: float = 0.0  # wall time of the whole replay
    acquire_seconds: float = 0.0  # time spent waiting in acquires (the worker's view of the stall)
    acquires: int = 0  # acquires that went to memd (a layer whose experts are all leased sends none)
    notes_unsent: int = 0  # layer notes the client dropped (trace socket full)
    steps: int = 0


def sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def drive(client, plan: ReplayPlan, layer_seconds: float) -> DriveResult:
    """Replay ``plan`` through ``client`` (a handshaken, ready ``MemdClient``)."""
    worker = os.getpid()
    result = DriveResult()
    start = time.perf_counter()
    for number, step in enumerate(plan.steps, start=1):
        for request, prompt in step.starts:
            client.emit(Op.REQUEST_START, m.RequestStartEvent(request, prompt))
        traces = []
        for r in step.layers:
            t0 = time.perf_counter()
            sent = guesses(r, plan.header.num_layers, client)
            client.note(number, r.layer, r.experts, step.requests, r.tokens, step.prefill, *sent)
            client.acquire(r.layer, r.experts, [], [], step=number, prefill=step.prefill)
            t1 = time.perf_counter()
            result.acquire_seconds += t1 - t0
            leased = client.last_leased  # served from the worker's leases: no message went to memd
            result.acquires += not leased
            if not client.leasing:
                client.release(r.layer, r.experts)
            nxt = sorted({e for t, e in zip(sent[0], sent[1]) if t == r.layer + 1})  # as the worker's step trace
            traces.append(m.LayerTrace(r.layer, r.experts, r.tokens, r.weights, nxt, leased))
            sleep_until(t1 + layer_seconds)  # the layer's compute, this loop's own work included
        client.emit(Op.STEP_TRACE, m.step_trace(worker, number, step.requests, step.tokens, step.prefill, traces))
        for request, generated in step.ends:
            client.emit(Op.REQUEST_END, m.RequestEndEvent(request, generated))
        if len(step.ends) == len(step.requests):  # nothing left running: the worker, idle, returns its leases
            client.return_leases()
        result.steps += 1
    result.seconds = time.perf_counter() - start
    result.notes_unsent = client.notes_dropped
    return result
