"""Replay a routing trace through memd's decisions with a simulated clock and reader: no model, no processes.

The same ``ExpertManager`` the server uses decides hits, loads, evictions, predictions and prefetches; only time
and I/O are simulated. Each MoE layer of each step is an acquire: the on-demand loads are read first (they
preempt prefetches, as the real reader does at chunk granularity; here at any instant), the layer waits until
its experts are resident (the stall), then computes for ``layer_seconds`` while prefetches proceed in the
background. The reader moves one expert in ``read_seconds`` (its bandwidth). A step's trace is learned when the
step ends, and a request's EAM goes to the EAMC after its last step, as in memd. Trace files carry no next-gate
guesses, so the simulation measures the EAMC and history prediction alone.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from common import messages as m
from common.traces import Step, TraceHeader
from services.memd.core import ExpertManager, Knobs
from services.memd.eamc import Eamc
from services.memd.policy import Key

WORKER = "sim"


@dataclass(frozen=True, slots=True)
class SimConfig:
    capacity: int  # pool slots
    knobs: Knobs = Knobs()
    read_seconds: float = 2e-3  # one expert's read
    layer_seconds: float = 1e-3  # one MoE layer's compute
    expert_bytes: int = 1 << 20


@dataclass(slots=True)
class SimResult:
    tokens: int = 0
    decode_tokens: int = 0
    hits: int = 0
    misses: int = 0
    decode_misses: int = 0  # in steps without prompt tokens (per decode token: decode_misses / decode_tokens)
    stall_seconds: float = 0.0
    seconds: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_late: int = 0
    lookahead: list[tuple[int, float, float]] = field(default_factory=list)  # (distance, precision, recall)

    @property
    def misses_per_token(self) -> float:
        return self.misses / max(1, self.tokens)

    @property
    def decode_misses_per_token(self) -> float:
        return self.decode_misses / max(1, self.decode_tokens)


@dataclass(slots=True)
class _Job:
    key: Key
    remaining: float  # bytes
    demand: bool
    priority: float
    seq: int

    def rank(self) -> tuple:
        return (0, self.seq) if self.demand else (1, -self.priority, self.seq)


class Simulator:
    def __init__(self, header: TraceHeader, cfg: SimConfig, eamc: Eamc | None = None):
        self.header, self.cfg = header, cfg
        self.core = ExpertManager(cfg.capacity, header.num_layers, header.num_experts, header.top_k,
                                  cfg.expert_bytes, cfg.knobs, eamc)
        self.bandwidth = cfg.expert_bytes / cfg.read_seconds
        self.now = 0.0
        self.jobs: dict[Key, _Job] = {}
        self._seq = itertools.count()
        self.result = SimResult()

    def run(self, steps: list[Step]) -> SimResult:
        last = {}
        for i, step in enumerate(steps):
            for request in step.requests:
                last[request] = i
        started = set()
        for i, step in enumerate(steps):
            for request in step.requests:
                if request not in started:
                    started.add(request)
                    self.core.request_start(request)
            self.step(i + 1, step)
            for request in step.requests:
                if last[request] == i:
                    self.core.request_end(request)
        return self.finish()

    def step(self, number: int, step: Step) -> None:
        prefill = [step.phase[r] == "prefill" for r in step.requests]
        tokens = [len(step.tokens[r]) for r in step.requests]
        layers = []
        for layer in sorted(step.layers):
            experts, counts = self._routing(step, layer)
            req = m.AcquireRequest(layer, experts, step.requests, counts, number, prefill)
            decode_misses = self.acquire(req)
            if not any(prefill):
                self.result.decode_misses += decode_misses
            layers.append(m.LayerTrace(layer, experts, counts, [[0.0] * len(experts) for _ in counts]))
        self.core.step_trace(m.StepTraceEvent(0, number, step.requests, tokens, prefill, layers))
        self.result.tokens += sum(tokens)
        self.result.decode_tokens += 0 if any(prefill) else sum(tokens)

    def _routing(self, step: Step, layer: int) -> tuple[list[int], list[list[int]]]:
        experts = sorted({e for rec in step.layers[layer] for e in rec.experts})
        column = {e: j for j, e in enumerate(experts)}
        row = {r: i for i, r in enumerate(step.requests)}
        counts = [[0] * len(experts) for _ in step.requests]
        for rec in step.layers[layer]:
            for e in rec.experts:
                counts[row[rec.req]][column[e]] += 1
        return experts, counts

    def acquire(self, req: m.AcquireRequest) -> int:
        """One layer: acquire, prefetch, wait, compute, release. Returns its on-demand misses."""
        core, table = self.core, self.core.table
        keys = [(req.layer, e) for e in req.experts]
        for key in keys:
            table.pin(key)
        misses = table.counters.misses
        plan = core.acquire(WORKER, req, self.now)
        for key, _slot in plan.loads:
            self._submit(key, demand=True)
        for key in plan.joins:
            self.jobs[key].demand, self.jobs[key].seq = True, next(self._seq)
        for key in plan.blocked:
            self._steal_for(key, plan.transient)
        prefetch = core.plan_prefetch(WORKER, req, self.bandwidth)
        for key in prefetch.cancel:
            self._cancel(key)
        for key, _slot, priority in prefetch.start:
            self._submit(key, demand=False, priority=priority)
        start = self.now
        while any(key in table.loading for key in keys):
            if not self.jobs:
                raise AssertionError(f"layer {req.layer}: experts loading without a read")
            self._advance(None)
        core.stall(req.layer, self.now - start)
        self._advance(self.now + self.cfg.layer_seconds)
        for key in keys:
            table.unpin(key)
        return table.counters.misses - misses

    def _submit(self, key: Key, *, demand: bool, priority: float = 0.0) -> None:
        self.jobs[key] = _Job(key, float(self.cfg.expert_bytes), demand, priority, next(self._seq))

    def _cancel(self, key: Key) -> None:
        if self.jobs.pop(key, None) is not None:
            self.core.load_cancelled(key)

    def _steal_for(self, key: Key, transient: bool) -> None:
        while self.core.reserve_demand(key, transient, raise_full=False) is None:
            if key in self.core.table.slot_of:
                return  # reserved meanwhile
            victim = self.core.steal_candidate()
            if victim is None:
                raise RuntimeError(f"{self.cfg.capacity} slots cannot hold one layer's experts and the pins")
            self._cancel(victim)
        self._submit(key, demand=True)

    def _advance(self, until: float | None) -> None:
        """Serve reads, best first, until ``until`` (or, with None, until the next read completes)."""
        while self.jobs:
            job = min(self.jobs.values(), key=_Job.rank)
            finish = self.now + job.remaining / self.bandwidth
            if until is not None and finish > until:
                job.remaining -= (until - self.now) * self.bandwidth
                self.now = until
                return
            self.now = finish
            del self.jobs[job.key]
            self.core.load_done(job.key, self.cfg.expert_bytes, self.cfg.read_seconds)
            if until is None:
                return
        if until is not None:
            self.now = max(self.now, until)

    def finish(self) -> SimResult:
        r, c, mt = self.result, self.core.table.counters, self.core.metrics
        r.hits, r.misses, r.stall_seconds, r.seconds = c.hits, c.misses, c.stall_seconds, self.now
        r.prefetch_issued, r.prefetch_used = sum(mt.prefetch_issued), sum(mt.prefetch_used)
        r.prefetch_wasted, r.prefetch_late = sum(mt.prefetch_wasted), mt.prefetch_late
        r.lookahead = [(d, s.correct / max(1, s.predicted), s.correct / max(1, s.routed))
                       for d, s in self.core.predictor.lookahead_stats()]
        return r


def simulate(header: TraceHeader, steps: list[Step], cfg: SimConfig, eamc: Eamc | None = None) -> SimResult:
    return Simulator(header, cfg, eamc).run(steps)
